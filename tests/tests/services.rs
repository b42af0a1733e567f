//! Each streaming service's own promises on the real stack: the scorer's model checks
//! and MODEL_ERROR dead letters, the cache-writer's monotonic cache and Redis outages,
//! the micro-batcher's poison handling and events it cannot batch.

use std::collections::HashMap;
use std::time::Duration;

use lanes_common::avro::AvroCodec;
use lanes_common::dlq::{self, ErrorClass};
use lanes_common::model::{Model, ModelError};
use lanes_common::records::{CloseReason, Event, Lane as LaneKind, MicroBatch, Prediction};
use lanes_tests::*;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use redis::AsyncCommands;

fn model_dir() -> std::path::PathBuf {
    root().join("models/fraud/1")
}

fn features() -> Vec<String> {
    lanes_common::model::ModelSpec::read(&model_dir())
        .unwrap()
        .features
}

fn batch(id: &str, rows: usize, width: usize, names: Vec<String>) -> MicroBatch {
    MicroBatch {
        batch_id: id.into(),
        source_partition: 0,
        first_offset: 0,
        last_offset: rows as i64 - 1,
        opened_at: 1,
        closed_at: 2,
        close_reason: CloseReason::Count,
        feature_names: names,
        features: (0..rows * width).map(|i| (i % 7) as f32).collect(),
        event_ids: (0..rows).map(|i| format!("{id}-e{i}")).collect(),
        entity_ids: (0..rows).map(|i| format!("card-{i}")).collect(),
        kinds: vec!["transaction".into(); rows],
        event_times: vec![1_795_000_000_000; rows],
        ingested_ats: vec![1_795_000_000_001; rows],
    }
}

async fn dead_letters(lane: &Lane, n: usize) -> Vec<(ErrorClass, String)> {
    let c = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    consume_n(&c, n, Duration::from_secs(60))
        .await
        .iter()
        .map(|m| {
            let h = m.headers().unwrap();
            (
                dlq::header_str(h, dlq::HEADER_CLASS)
                    .unwrap()
                    .parse()
                    .unwrap(),
                dlq::header_str(h, dlq::HEADER_STAGE).unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_batches_are_dead_lettered_and_the_scorer_goes_on() {
    let lane = Lane::new("model-error");
    lane.create_topics().await;
    let running = lane.start(&[lanes_scorer::def()]);
    running.ready().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    let topic = &lane.settings.topics.batches;
    let width = features().len();
    // Another writer's batch whose columns disagree: indexing it would panic.
    let mut ragged = batch("ragged", 3, width, features());
    ragged.entity_ids.pop();
    // Values the micro-batcher never batches: the model would score them regardless.
    let mut nan = batch("nan", 3, width, features());
    nan.features[width + 1] = f32::NAN;
    let mut infinite = batch("infinite", 2, width, features());
    infinite.features[0] = f32::NEG_INFINITY;
    // An id copied into each row's prediction: 100 KB of it would make 5 MB of these.
    let mut long_id = batch("long", 50, width, features());
    long_id.batch_id = "x".repeat(100_000);
    for b in [
        batch("short", 4, width - 1, features()),
        batch(
            "renamed",
            2,
            width,
            (0..width).map(|i| format!("f{i}")).collect(),
        ),
        ragged,
        nan,
        infinite,
        long_id,
        batch("good", 3, width, features()),
    ] {
        produce(&p, topic, b"0", &codec.encode(topic, &b).await.unwrap()).await;
    }
    // Columns of different lengths are a malformed record; the right shape with the
    // wrong feature names is the model's refusal.
    let dead = dead_letters(&lane, 6).await;
    assert_eq!(
        dead,
        vec![
            (ErrorClass::DecodeError, "scorer".into()),
            (ErrorClass::ModelError, "scorer".into()),
            (ErrorClass::DecodeError, "scorer".into()),
            (ErrorClass::NonFinite, "scorer".into()),
            (ErrorClass::NonFinite, "scorer".into()),
            (ErrorClass::DecodeError, "scorer".into()),
        ]
    );

    let c = consumer(&lane.settings, &[&lane.settings.topics.predictions]);
    let got = consume_n(&c, 3, Duration::from_secs(60)).await;
    for m in &got {
        let pr = codec
            .decode::<Prediction>(m.payload().unwrap())
            .await
            .unwrap()
            .record;
        assert!(pr.event_id.starts_with("good-"), "{}", pr.event_id);
        assert_eq!(pr.batch_id.as_deref(), Some("good"));
    }
    assert_eq!(
        running.metric(
            "lanes_scorer_dead_letters_total",
            &[("class", "MODEL_ERROR")]
        ),
        1.0
    );
    assert_eq!(
        running.metric(
            "lanes_scorer_dead_letters_total",
            &[("class", "DECODE_ERROR")]
        ),
        3.0
    );
    assert_eq!(
        running.metric(
            "lanes_scorer_dead_letters_total",
            &[("class", "NON_FINITE")]
        ),
        2.0
    );
    assert_eq!(
        running.metric(
            "lanes_scorer_model_info",
            &[("name", "fraud"), ("version", "1")]
        ),
        1.0
    );
    assert!(running.metric("lanes_scorer_inference_seconds", &[("batch_size", "4")]) >= 1.0);
    running.stop().await;
}

/// A copy of the default model with `model.toml` edited by `edit`.
fn broken_model(edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        model_dir().join("model.onnx"),
        dir.path().join("model.onnx"),
    )
    .unwrap();
    let toml = std::fs::read_to_string(model_dir().join("model.toml")).unwrap();
    std::fs::write(dir.path().join("model.toml"), edit(toml)).unwrap();
    dir
}

#[tokio::test]
async fn a_model_that_does_not_match_its_toml_is_refused_with_the_reason() {
    let fewer = broken_model(|t| t.replace(r#", "is_online"]"#, "]"));
    let err = Model::load(fewer.path()).unwrap_err();
    assert!(matches!(err, ModelError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("9 features"), "{err}");

    let input = broken_model(|t| t.replace(r#"input = "input""#, r#"input = "x""#));
    let err = Model::load(input.path()).unwrap_err().to_string();
    assert!(err.contains("no input named \"x\""), "{err}");

    let output = broken_model(|t| t.replace(r#"output = "probabilities""#, r#"output = "proba""#));
    let err = Model::load(output.path()).unwrap_err().to_string();
    assert!(err.contains("no output named \"proba\""), "{err}");

    let corrupt = broken_model(|t| t);
    std::fs::write(corrupt.path().join("model.onnx"), b"not a model").unwrap();
    assert!(matches!(
        Model::load(corrupt.path()).unwrap_err(),
        ModelError::Spec { .. }
    ));

    // The real model loads, and scores agree with the declared output.
    let model = Model::load(&model_dir()).unwrap();
    let scores = model.score(&vec![0.5; 2 * features().len()], 2).unwrap();
    assert_eq!(scores.len(), 2);
    assert_eq!(scores[0], scores[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scorer_with_a_mismatched_model_stays_not_ready() {
    let fewer = broken_model(|t| t.replace(r#", "is_online"]"#, "]"));
    let mut lane = Lane::new("not-ready");
    lane.settings.model.dir = fewer.path().to_path_buf();
    let running = lane.start(&[lanes_scorer::def()]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !running.tasks[0].1.is_set(),
        "not ready with a refused model"
    );
    assert!(
        !running.tasks[0].2.is_finished(),
        "waits for an operator instead of crash-looping"
    );
    assert_eq!(running.metric("lanes_scorer_model_info", &[]), 0.0);
    running.stop().await;
}

/// 2026-11-18: predictions' event times are offsets from here, since the cache-writer
/// refuses times before 2000 or far ahead.
const T0: i64 = 1_795_000_000_000;

fn prediction(entity: &str, event_time: i64, scored_at: i64, score: f64) -> Prediction {
    let event_time = T0 + event_time;
    Prediction {
        event_id: format!("{entity}-{event_time}-{scored_at}"),
        entity_id: entity.into(),
        score,
        label: Some("legit".into()),
        model_name: "fraud".into(),
        model_version: "1".into(),
        lane: LaneKind::Batch,
        event_time,
        ingested_at: None,
        scored_at,
        batch_id: None,
    }
}

async fn cached(lane: &Lane, entity: &str) -> HashMap<String, String> {
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    r.hgetall(format!("{}{entity}", lane.settings.cache_writer.key_prefix))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_never_rolls_back() {
    let mut lane = Lane::new("monotonic");
    lane.settings.cache_writer.ttl_seconds = 600;
    lane.create_topics().await;
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    let topic = lane.settings.topics.predictions.clone();
    let send = |pr: Prediction| {
        let (codec, p, topic) = (codec.clone(), p.clone(), topic.clone());
        async move {
            let bytes = codec.encode(&topic, &pr).await.unwrap();
            produce(&p, &topic, pr.entity_id.as_bytes(), &bytes).await;
        }
    };
    let writes = |result| running.metric("lanes_cache_writer_writes_total", &[("result", result)]);
    let settle = |n: f64| async move {
        wait_for("writes applied", Duration::from_secs(30), || async {
            (writes("written") + writes("stale") + writes("duplicate") >= n).then_some(())
        })
        .await
    };

    send(prediction("a", 100, 1, 0.1)).await;
    settle(1.0).await;
    assert_eq!(cached(&lane, "a").await["score"], "0.1");
    // An older event, even scored later, does not replace a newer one.
    send(prediction("a", 50, 9, 0.9)).await;
    settle(2.0).await;
    assert_eq!(cached(&lane, "a").await["score"], "0.1");
    // Same event time: the later scoring wins; a replay of it (same id and version)
    // is a duplicate and changes nothing, not even written_at.
    send(prediction("a", 100, 5, 0.5)).await;
    settle(3.0).await;
    let before = cached(&lane, "a").await;
    send(prediction("a", 100, 5, 0.7)).await;
    settle(4.0).await;
    let entry = cached(&lane, "a").await;
    assert_eq!(entry, before);
    assert_eq!(
        (entry["score"].as_str(), entry["scored_at"].as_str()),
        ("0.5", "5")
    );
    assert_eq!(entry["lane"], "BATCH");
    assert_eq!(
        (writes("written"), writes("stale"), writes("duplicate")),
        (2.0, 1.0, 1.0)
    );
    // The same event scored by a new model version is not a duplicate.
    let mut upgraded = prediction("a", 100, 6, 0.6);
    upgraded.event_id = entry["event_id"].clone();
    upgraded.model_version = "2".into();
    send(upgraded).await;
    settle(5.0).await;
    let entry = cached(&lane, "a").await;
    assert_eq!(
        (entry["score"].as_str(), entry["model_version"].as_str()),
        ("0.6", "2")
    );

    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = r
        .ttl(format!("{}a", lane.settings.cache_writer.key_prefix))
        .await
        .unwrap();
    assert!((1..=600).contains(&ttl), "ttl {ttl}");
    running.stop().await;
}

/// Of an entity's events that reach the features loop together, only the first with
/// the newest event time is sent to Redis; the others are done, counted `superseded`,
/// and the entry is what sending them all in order would leave. Where Redis refuses
/// that one's key, each of the entity's events is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn older_events_of_an_entity_in_one_pipeline_are_superseded() {
    use lanes_common::records::Event;

    let lane = Lane::new("superseded");
    lane.create_topics().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    let topic = &lane.settings.topics.events;
    // Written before the cache-writer starts, so one fetch reads them as one pipeline.
    let sent = [
        ("hot", 100),
        ("hot", 300),
        ("hot", 200),
        ("hot", 300),
        ("hot", 50),
        ("cold", 10),
        ("refused", 20),
        ("refused", 30),
    ];
    // Not a hash: Redis refuses the script's read of it (WRONGTYPE).
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let refused = format!("{}refused", lane.settings.cache_writer.key_prefix);
    let _: () = r.set(&refused, "a string").await.unwrap();
    for (i, &(entity, t)) in sent.iter().enumerate() {
        let mut features: lanes_common::features::Features =
            features().into_iter().map(|name| (name, 0.5)).collect();
        features.insert("amount".into(), i as f64);
        let event = Event {
            event_id: format!("{entity}-{i}"),
            entity_id: entity.into(),
            kind: "transaction".into(),
            event_time: T0 + t,
            ingested_at: T0 + t,
            features,
        };
        let bytes = codec.encode(topic, &event).await.unwrap();
        produce(&p, topic, entity.as_bytes(), &bytes).await;
    }
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let writes = |result| {
        running.metric(
            "lanes_cache_writer_feature_writes_total",
            &[("result", result)],
        )
    };
    wait_for("the events handled", Duration::from_secs(30), || async {
        (writes("written") + writes("stale") + writes("superseded") >= 6.0).then_some(())
    })
    .await;
    assert_eq!(
        (writes("written"), writes("stale"), writes("superseded")),
        (2.0, 0.0, 4.0)
    );
    let amount = |cached: &HashMap<String, String>| {
        let features: HashMap<String, f64> = serde_json::from_str(&cached["features"]).unwrap();
        assert_eq!(features.len(), self::features().len(), "{features:?}");
        features["amount"]
    };
    let hot = cached(&lane, "hot").await;
    assert_eq!(hot["features_event_time"], (T0 + 300).to_string());
    assert_eq!(amount(&hot), 1.0);
    assert_eq!(amount(&cached(&lane, "cold").await), 5.0);
    let letters = dead_letters(&lane, 2).await;
    assert_eq!(
        letters,
        vec![(ErrorClass::CacheWriteError, "cache-writer".to_string()); 2]
    );
    let _: () = r.del(&refused).await.unwrap();
    running.stop().await;
}

/// The guard header of a prediction scored from a request's own features (the
/// responder's) reaches the cache-writer's script: such a prediction yields to the
/// entity's newer online features, while the same prediction without the header is
/// written. The cache-writer's other consumer reads no headers; this one must. A
/// header name that is not UTF-8 beside the guard changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guarded_prediction_yields_to_newer_features() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;

    let mut lane = Lane::new("guard");
    lane.settings.cache_writer.ttl_seconds = 600;
    lane.create_topics().await;
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = client_producer(&lane.settings);
    let topic = lane.settings.topics.predictions.clone();
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let prefix = &lane.settings.cache_writer.key_prefix;
    for entity in ["guarded", "odd-header", "plain"] {
        let _: () = r
            .hset(format!("{prefix}{entity}"), "features_event_time", T0 + 200)
            .await
            .unwrap();
    }
    let send = |pr: Prediction, guard: bool, odd_name: bool| {
        let (codec, p, topic) = (codec.clone(), p.clone(), topic.clone());
        async move {
            let bytes = codec.encode(&topic, &pr).await.unwrap();
            let mut record = FutureRecord::to(&topic)
                .key(pr.entity_id.as_str())
                .payload(&bytes);
            let mut headers = OwnedHeaders::new();
            if odd_name {
                // rdkafka panics reading a header name that is not UTF-8.
                headers = with_raw_header(headers, b"\xfe\xff", b"x");
            }
            if guard {
                headers = headers.insert(Header {
                    key: lanes_common::cache::HEADER_GUARD,
                    value: Some("1"),
                });
            }
            if guard || odd_name {
                record = record.headers(headers);
            }
            p.send(record, Duration::from_secs(10))
                .await
                .expect("delivered");
        }
    };
    let writes = |result| running.metric("lanes_cache_writer_writes_total", &[("result", result)]);
    send(prediction("guarded", 100, 1, 0.3), true, false).await;
    send(prediction("odd-header", 100, 1, 0.5), true, true).await;
    send(prediction("plain", 100, 1, 0.4), false, false).await;
    wait_for(
        "the predictions handled",
        Duration::from_secs(30),
        || async { (writes("written") + writes("stale") >= 3.0).then_some(()) },
    )
    .await;
    assert_eq!((writes("written"), writes("stale")), (1.0, 2.0));
    assert_eq!(cached(&lane, "guarded").await.get("score"), None);
    assert_eq!(cached(&lane, "odd-header").await.get("score"), None);
    assert_eq!(cached(&lane, "plain").await["score"], "0.4");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_is_retried_without_commit_or_dead_letter() {
    let port = free_port();
    let mut redis_proc = redis_server(port);
    let mut lane = Lane::new("redis-down");
    lane.settings.redis.url = format!("redis://127.0.0.1:{port}");
    lane.create_topics().await;
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    let topic = lane.settings.topics.predictions.clone();
    let publish = |pr: Prediction| {
        let (codec, p, topic) = (codec.clone(), p.clone(), topic.clone());
        async move {
            produce(
                &p,
                &topic,
                pr.entity_id.as_bytes(),
                &codec.encode(&topic, &pr).await.unwrap(),
            )
            .await
        }
    };
    publish(prediction("before", 1, 1, 0.2)).await;
    wait_for("first write", Duration::from_secs(30), || async {
        (cached(&lane, "before")
            .await
            .get("score")
            .map(String::as_str)
            == Some("0.2"))
        .then_some(())
    })
    .await;

    signal(&redis_proc.0, "KILL");
    redis_proc.0.wait().unwrap();
    for i in 0..5 {
        publish(prediction(&format!("during-{i}"), 2, 2, 0.3)).await;
    }
    wait_for("failed writes", Duration::from_secs(30), || async {
        (running.metric("lanes_cache_writer_redis_errors_total", &[]) >= 2.0).then_some(())
    })
    .await;
    // Nothing after the outage is committed for the cache-writer's group.
    let mut tpl = rdkafka::TopicPartitionList::new();
    for part in 0..lane.settings.kafka.partitions {
        tpl.add_partition(&topic, part);
    }
    let committed_before: i64 = committed_sum(&lane, &tpl);
    assert!(
        committed_before <= 1,
        "only the first prediction may be committed, got {committed_before}"
    );

    let _redis_back = redis_server(port);
    for i in 0..5 {
        let entity = format!("during-{i}");
        wait_for(
            "writes after the outage",
            Duration::from_secs(60),
            || async {
                (cached(&lane, &entity)
                    .await
                    .get("score")
                    .map(String::as_str)
                    == Some("0.3"))
                .then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        running.metric("lanes_cache_writer_dead_letters_total", &[]),
        0.0
    );
    running.stop().await;
    assert_eq!(
        committed_sum(&lane, &tpl),
        6,
        "all six committed once written"
    );
}

/// The cache-writer group's committed offsets, summed over partitions.
fn committed_sum(lane: &Lane, tpl: &rdkafka::TopicPartitionList) -> i64 {
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &lane.settings.kafka.bootstrap_servers)
        .set("group.id", &lane.settings.cache_writer.group);
    let c: rdkafka::consumer::BaseConsumer = cfg.create().unwrap();
    c.committed_offsets(tpl.clone(), Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_events_are_dead_lettered_by_the_micro_batcher() {
    let lane = Lane::new("mb-poison");
    lane.create_topics().await;
    let running = lane.start(&[lanes_micro_batcher::def()]);
    running.ready().await;
    let p = producer(&lane.settings);
    let topic = &lane.settings.topics.events;
    produce(&p, topic, b"k", b"{\"json\": \"on an Avro topic\"}").await;
    produce(&p, topic, b"k", &[0, 0x7f, 0xff, 0xff, 0x00, 1, 2, 3]).await;
    let mut dead = dead_letters(&lane, 2).await;
    dead.sort();
    assert_eq!(
        dead,
        vec![
            (ErrorClass::InvalidMagicByte, "micro-batcher".to_string()),
            (ErrorClass::UnknownSchemaId, "micro-batcher".to_string())
        ]
    );
    running.stop().await;
}

/// Events written straight to the events topic, past ingest's checks, with a feature the
/// model cannot take (NaN, or beyond a 32-bit float) or without one: each is
/// dead-lettered alone. In a batch its row would score NaN and the scorer would refuse
/// the whole batch with it, or its missing column would be scored as 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_with_a_non_finite_feature_is_dead_lettered_alone() {
    let mut lane = Lane::new("mb-nan");
    lane.settings.micro_batcher.max_delay_ms = 100;
    lane.create_topics().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    let topic = lane.settings.topics.events.clone();
    let now = lanes_common::records::now_millis();
    // `None`: the event lacks `amount`, which would be scored as 0.
    for (i, amount) in [
        Some(1.0),
        Some(f64::NAN),
        Some(2.0),
        Some(1e39),
        Some(3.0),
        None,
    ]
    .into_iter()
    .enumerate()
    {
        let mut features: lanes_common::features::Features =
            features().into_iter().map(|name| (name, 1.0)).collect();
        match amount {
            Some(amount) => features.insert("amount".into(), amount),
            None => features.remove("amount"),
        };
        let event = Event {
            event_id: format!("e{i}"),
            entity_id: "card-1".into(),
            kind: "transaction".into(),
            event_time: now,
            ingested_at: now,
            features,
        };
        let bytes = codec.encode(&topic, &event).await.unwrap();
        produce(&p, &topic, b"card-1", &bytes).await;
    }
    let running = lane.start(&[lanes_micro_batcher::def()]);
    running.ready().await;
    let batches = consumer(&lane.settings, &[&lane.settings.topics.batches]);
    let mut batched = Vec::new();
    while batched.len() < 3 {
        let m = consume_n(&batches, 1, Duration::from_secs(60))
            .await
            .remove(0);
        let b = codec
            .decode::<MicroBatch>(m.payload().unwrap())
            .await
            .unwrap()
            .record;
        assert!(b.features.iter().all(|v| v.is_finite()), "{b:?}");
        batched.extend(b.event_ids);
    }
    assert_eq!(batched, ["e0", "e2", "e4"]);
    let stage = "micro-batcher".to_string();
    assert_eq!(
        dead_letters(&lane, 3).await,
        vec![
            (ErrorClass::NonFinite, stage.clone()),
            (ErrorClass::NonFinite, stage.clone()),
            (ErrorClass::MissingField, stage)
        ]
    );
    let events =
        |outcome| running.metric("lanes_micro_batcher_events_total", &[("outcome", outcome)]);
    assert_eq!((events("batched"), events("dead_letter")), (3.0, 3.0));
    running.stop().await;
}
