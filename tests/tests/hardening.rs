//! What a hostile record or an unlucky operator could do to a service, each tried
//! against the real stack: client clocks, oversized records, values past the model's
//! float range, keys Redis refuses, scoring times far ahead, recursive writer schemas,
//! schema ids registered a moment late or under subjects we may not read, refreshes that must land twice, lag series of
//! partitions that moved, and dependencies down for a minute while events flow.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use lanes_common::avro::AvroCodec;
use lanes_common::cache;
use lanes_common::dlq::{self, ErrorClass};
use lanes_common::generator::{FEATURES, Generator, Sample};
use lanes_common::records::{Event, now_millis};
use lanes_tests::*;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use redis::AsyncCommands;

fn class(m: &OwnedMessage) -> ErrorClass {
    dlq::header_str(m.headers().unwrap(), dlq::HEADER_CLASS)
        .unwrap()
        .parse()
        .unwrap()
}

fn raw(entity: &str, event_time: i64, amount: f64) -> String {
    let mut f: BTreeMap<&str, f64> = FEATURES.iter().map(|n| (*n, 1.0)).collect();
    f.insert("amount", amount);
    serde_json::json!({"entity_id": entity, "event_time": event_time, "features": f}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_raw_events_are_dead_lettered_and_ingest_stays_up() {
    let lane = Lane::new("hostile-raw");
    lane.create_topics().await;
    let running = lane.start(&[lanes_ingest::def()]);
    running.ready().await;
    let p = producer(&lane.settings);
    let now = now_millis();
    let hostile = [
        raw("micro", now * 1000, 1.0),
        raw("ahead", now + 3_600_000, 1.0),
        raw("seconds", now / 1000, 1.0),
        raw("huge", now, 1e39),
        // A bare NaN (Python's json.dumps writes them) is no entity id.
        raw("nan-id", now, 1.0).replace("\"nan-id\"", "NaN"),
        // A cache key and a Kafka key longer than the cache takes.
        raw(&"l".repeat(513), now, 1.0),
    ];
    lane.publish_raw(&p, &hostile).await;
    // Just under the producer's 1 MB limit: its dead letter with headers would pass it.
    let big = vec![b'x'; 999_800];
    produce(&p, &lane.settings.topics.raw, b"big", &big).await;
    lane.publish_raw(&p, &[raw("fine", now, 1.0)]).await;

    let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    let letters = consume_n(&dlq, 7, Duration::from_secs(60)).await;
    let mut classes: Vec<ErrorClass> = letters.iter().map(class).collect();
    classes.sort();
    assert_eq!(
        classes,
        vec![
            ErrorClass::MissingField,
            ErrorClass::NonFinite,
            ErrorClass::InvalidEventTime,
            ErrorClass::InvalidEventTime,
            ErrorClass::InvalidEventTime,
            ErrorClass::TooLarge,
            ErrorClass::TooLarge
        ]
    );
    let reason = |m: &OwnedMessage| {
        dlq::header_str(m.headers().unwrap(), dlq::HEADER_MESSAGE).map(str::to_string)
    };
    assert!(
        letters
            .iter()
            .any(|m| reason(m).as_deref() == Some("entity_id is 513 bytes, over 512")),
        "{:?}",
        letters.iter().map(reason).collect::<Vec<_>>()
    );
    let cut = letters
        .iter()
        .find(|m| class(m) == ErrorClass::TooLarge && payload(m).len() > 1000)
        .unwrap();
    let h = cut.headers().unwrap();
    assert_eq!(
        dlq::header_str(h, dlq::HEADER_ORIGINAL_VALUE_SIZE),
        Some("999800")
    );
    let kept = payload(cut);
    assert!(
        kept.len() > 900_000 && kept.len() < 999_800,
        "{} bytes kept",
        kept.len()
    );
    assert!(kept.iter().all(|b| *b == b'x'), "a prefix of the original");

    let events = consumer(&lane.settings, &[&lane.settings.topics.events]);
    let m = consume_n(&events, 1, Duration::from_secs(60))
        .await
        .remove(0);
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let e = codec.decode::<Event>(payload(&m)).await.unwrap().record;
    assert_eq!(
        e.entity_id, "fine",
        "ingest went on after every one of them"
    );
    for (task, _, handle) in &running.tasks {
        assert!(!handle.is_finished(), "{task} stopped");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_redis_refuses_is_dead_lettered_alone() {
    let lane = Lane::new("wrongtype");
    lane.create_topics().await;
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = |e: &str| format!("{}{e}", lane.settings.cache_writer.key_prefix);
    // Someone else's string where an entity's hash belongs.
    let _: () = r.set(key("taken"), "not a hash").await.unwrap();
    // A hash whose times are not numbers: it is rewritten, not a reason to fail the
    // call the other keys share.
    let _: () = r
        .hset_multiple(
            key("garbled"),
            &[
                ("event_time", "soon"),
                ("scored_at", "x"),
                ("features_event_time", "later"),
            ],
        )
        .await
        .unwrap();
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    let topic = &lane.settings.topics.predictions;
    for (entity, score) in [
        ("ok-1", 0.1),
        ("taken", 0.2),
        ("garbled", 0.4),
        ("ok-2", 0.3),
        ("bad-score", f64::NAN),
        ("scored-ahead", 0.5),
        ("ingested-long-ago", 0.6),
        ("long-version", 0.8),
        ("long-entity", 0.9),
        ("long-event-id", 0.9),
    ] {
        let mut prediction = prediction_now(entity, score);
        match entity {
            // A cache key longer than the cache takes; an id no writer of Lanes makes.
            "long-entity" => prediction.entity_id = "l".repeat(513),
            "long-event-id" => prediction.event_id = "l".repeat(1025),
            // Readers age an entry from its scoring time: this one would never age.
            "scored-ahead" => prediction.scored_at += 3_600_000,
            // Only a latency metric reads it; it must not stop the writer.
            "ingested-long-ago" => prediction.ingested_at = Some(i64::MIN),
            // Copied into every answer from the entry: a 60-byte request would get
            // 500 KB back.
            "long-version" => prediction.model_version = "v".repeat(500_000),
            _ => {}
        }
        let bytes = codec.encode(topic, &prediction).await.unwrap();
        produce(&p, topic, entity.as_bytes(), &bytes).await;
    }
    // No entity: it would land on the bare key prefix, which every such record shares.
    let nameless = prediction_now("", 0.7);
    let bytes = codec.encode(topic, &nameless).await.unwrap();
    produce(&p, topic, b"no-entity", &bytes).await;
    // Events for the online-features loop, past ingest's checks: a value JSON cannot
    // hold (written as `null`, it would leave the entry's features unreadable), no
    // entity, a model feature left out (the responder could not score from the entry),
    // beside two that are fine, one with a feature the model does not take.
    let events = &lane.settings.topics.events;
    let now = now_millis();
    for (key, entity, amount) in [
        ("features-nan", "features-nan", Some(f64::NAN)),
        ("features-huge", "features-huge", Some(1e39)),
        ("features-no-entity", "", Some(1.0)),
        ("features-missing", "features-missing", None),
        ("features-extra", "features-extra", Some(3.5)),
        ("features-ok", "features-ok", Some(2.5)),
        ("features-long-entity", &"l".repeat(513), Some(1.0)),
    ] {
        let mut features: lanes_common::features::Features =
            FEATURES.iter().map(|f| (f.to_string(), 1.0)).collect();
        match amount {
            Some(amount) => features.insert("amount".into(), amount),
            None => features.remove("amount"),
        };
        if key == "features-extra" {
            // Not the model's: not read, not kept, whatever its value.
            features.insert("not_in_model".into(), f64::NAN);
        }
        let event = Event {
            event_id: format!("{key}-e"),
            entity_id: entity.into(),
            kind: "transaction".into(),
            event_time: now,
            ingested_at: now,
            features,
        };
        let bytes = codec.encode(events, &event).await.unwrap();
        produce(&p, events, key.as_bytes(), &bytes).await;
    }
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    let mut letters: Vec<(String, ErrorClass)> = consume_n(&dlq, 12, Duration::from_secs(60))
        .await
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(m.key().unwrap()).into_owned(),
                class(m),
            )
        })
        .collect();
    letters.sort();
    assert_eq!(
        letters,
        vec![
            ("bad-score".to_string(), ErrorClass::ModelError),
            ("features-huge".to_string(), ErrorClass::NonFinite),
            ("features-long-entity".to_string(), ErrorClass::TooLarge),
            ("features-missing".to_string(), ErrorClass::MissingField),
            ("features-nan".to_string(), ErrorClass::NonFinite),
            ("features-no-entity".to_string(), ErrorClass::MissingField),
            ("long-entity".to_string(), ErrorClass::TooLarge),
            ("long-event-id".to_string(), ErrorClass::TooLarge),
            ("long-version".to_string(), ErrorClass::TooLarge),
            ("no-entity".to_string(), ErrorClass::MissingField),
            ("scored-ahead".to_string(), ErrorClass::InvalidEventTime),
            ("taken".to_string(), ErrorClass::CacheWriteError)
        ]
    );
    let prefix = &lane.settings.cache_writer.key_prefix;
    let bare: bool = r.exists(prefix).await.unwrap();
    assert!(!bare, "nothing written to the bare key prefix");
    for refused in [
        "features-nan",
        "features-huge",
        "features-missing",
        "long-version",
        "long-event-id",
        &"l".repeat(513),
    ] {
        let held: bool = r.exists(key(refused)).await.unwrap();
        assert!(!held, "{refused} cached");
    }
    // Each entity's online features, once written.
    let features = |entity: &str| {
        let (r, key) = (r.clone(), key(entity));
        async move {
            let json = wait_for(&key, Duration::from_secs(30), || {
                let (mut r, key) = (r.clone(), key.clone());
                async move {
                    r.hget::<_, _, Option<String>>(key, "features")
                        .await
                        .unwrap()
                }
            })
            .await;
            serde_json::from_str::<BTreeMap<String, f64>>(&json).unwrap()
        }
    };
    let ok = features("features-ok").await;
    assert_eq!(ok["amount"], 2.5, "{ok:?}");
    let extra = features("features-extra").await;
    assert_eq!(extra.len(), FEATURES.len(), "the model's only: {extra:?}");
    assert_eq!(extra["amount"], 3.5);
    for (entity, score) in [
        ("ok-1", "0.1"),
        ("garbled", "0.4"),
        ("ok-2", "0.3"),
        ("ingested-long-ago", "0.6"),
    ] {
        let got: Option<String> = r.hget(key(entity), "score").await.unwrap();
        assert_eq!(
            got.as_deref(),
            Some(score),
            "{entity} written beside the refused key"
        );
    }
    let taken: String = r.get(key("taken")).await.unwrap();
    assert_eq!(taken, "not a hash");
    // Timed: the three written with a real ingest time, each a moment old; not the one
    // ingested at i64::MIN, which would put 292 million years in the sum.
    let timed = |m| running.metric(m, &[]);
    assert_eq!(timed("lanes_cache_writer_ingest_to_cache_seconds"), 3.0);
    let sum = timed("lanes_cache_writer_ingest_to_cache_seconds_sum");
    assert!((0.0..3.0 * 600.0).contains(&sum), "{sum}");
    running.stop().await;
}

/// Writes refused with `NOREPLICAS`, as a primary refuses them while it has fewer
/// replicas than `min-replicas-to-write`, pass when the replica comes back: the writer
/// holds its records and retries, a call of many (the predictions) as well as a record
/// alone in its call (the features), and dead-letters none of them. Taken for good,
/// every write while it lasted was dead-lettered, and a record alone in its call stopped
/// the writer after each restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_refused_for_want_of_replicas_wait_for_them() {
    let port = free_port();
    let _own = redis_server(port);
    let mut lane = Lane::new("noreplicas");
    lane.settings.redis.url = format!("redis://127.0.0.1:{port}");
    lane.create_topics().await;
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let replicas = |n: &'static str| {
        let mut r = r.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg(&["SET", "min-replicas-to-write", n])
                .query_async(&mut r)
                .await
                .unwrap();
        }
    };
    // The server has no replica.
    replicas("1").await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    // Five predictions waiting together, read in one call; one event, alone in its loop.
    let predictions = &lane.settings.topics.predictions;
    let many: Vec<String> = (0..5).map(|i| format!("many-{i}")).collect();
    for entity in &many {
        let bytes = codec
            .encode(predictions, &prediction_now(entity, 0.5))
            .await
            .unwrap();
        produce(&p, predictions, entity.as_bytes(), &bytes).await;
    }
    let events = &lane.settings.topics.events;
    let now = now_millis();
    let event = Event {
        event_id: unique("e"),
        entity_id: "alone".into(),
        kind: "transaction".into(),
        event_time: now,
        ingested_at: now,
        features: FEATURES.iter().map(|f| (f.to_string(), 1.0)).collect(),
    };
    let bytes = codec.encode(events, &event).await.unwrap();
    produce(&p, events, b"alone", &bytes).await;
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    // Both loops refused, and retrying.
    running
        .wait_metric("lanes_cache_writer_redis_errors_total", &[], 6.0)
        .await;
    for (task, _, handle) in &running.tasks {
        assert!(!handle.is_finished(), "{task} stopped");
    }
    let letters = || running.metric("lanes_cache_writer_dead_letters_total", &[]);
    assert_eq!(letters(), 0.0, "dead-lettered while refused");
    replicas("0").await;
    let key = |e: &str| format!("{}{e}", lane.settings.cache_writer.key_prefix);
    let written = many.iter().map(|e| (e.as_str(), "score"));
    for (entity, field) in written.chain([("alone", "features")]) {
        let (r, key) = (r.clone(), key(entity));
        wait_for(
            &format!("{entity} written"),
            Duration::from_secs(30),
            || {
                let (mut r, key) = (r.clone(), key.clone());
                async move { r.hget::<_, _, Option<String>>(key, field).await.unwrap() }
            },
        )
        .await;
    }
    assert_eq!(letters(), 0.0);
    let score: String = r.hget(key("many-0"), "score").await.unwrap();
    assert_eq!(score, "0.5");
    running.stop().await;
}

/// The writer schemas a service keeps are bounded: anyone who can register schemas can
/// register many and write one small record of each, and the decoder kept every one for
/// good. Past `registry.max_writer_schemas` it starts over: the first schema read is
/// fetched again (here from a registry that has turned slow), the last is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_schemas_past_the_cache_limit_are_let_go() {
    let mut lane = Lane::new("writers");
    let registry = lane.settings.registry.url.trim_start_matches("http://");
    let proxy = lanes_tests::proxy::SlowProxy::start(registry.trim_end_matches('/')).await;
    lane.settings.registry.url = format!("http://{}", proxy.addr);
    lane.settings.registry.max_writer_schemas = 4;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let mut framed = Vec::new();
    for i in 0..6 {
        let name = unique("w").replace('-', "_");
        let schema = format!(
            r#"{{"type":"record","name":"{name}","fields":[{{"name":"n{i}","type":"int"}}]}}"#
        );
        let r = register_schema(&lane.settings, &format!("{name}-value"), &schema).await;
        let id = u32::try_from(r["id"].as_u64().unwrap()).unwrap();
        // The int i, zigzag-encoded.
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.push(2 * i as u8);
        framed.push(bytes);
    }
    for (i, bytes) in framed.iter().enumerate() {
        let (json, _) = codec.decode_json(bytes).await.unwrap();
        assert_eq!(json[format!("n{i}")], i, "{json}");
    }
    // Four, then the fifth started the cache over: two counted since.
    let held = codec.writer_schemas();
    assert_eq!(held.schemas, 2, "{held:?}");
    proxy.set_delay(Duration::from_secs(30));
    let last = tokio::time::timeout(Duration::from_secs(5), codec.decode_json(&framed[5])).await;
    assert!(
        matches!(last, Ok(Ok(_))),
        "the last schema is held: {last:?}"
    );
    let first = tokio::time::timeout(Duration::from_secs(3), codec.decode_json(&framed[0])).await;
    assert!(
        first.is_err(),
        "the first schema was let go, so it is asked for again: {first:?}"
    );
    proxy.set_delay(Duration::ZERO);
}

/// A record of a registered writer schema whose type contains itself, nested as deep as
/// its bytes allow, and one of arrays of nulls. apache-avro decodes by recursion and
/// bounds each array's allocation alone: read, the first would overflow the stack and
/// the second (with larger counts) exhaust memory, taking every service in the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_of_a_recursive_schema_is_dead_lettered_and_the_writer_stays_up() {
    let lane = Lane::new("recursive");
    lane.create_topics().await;
    let r = register_schema(
        &lane.settings,
        &format!("{}-value", unique("list")),
        r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#,
    )
    .await;
    let id = u32::try_from(r["id"].as_u64().unwrap()).unwrap();
    // 200,000 nodes, each the union's second branch (zigzag 1), then a null.
    let mut deep = vec![0u8];
    deep.extend_from_slice(&id.to_be_bytes());
    deep.extend(std::iter::repeat_n(2u8, 200_000));
    deep.push(0);
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let p = producer(&lane.settings);
    let topic = &lane.settings.topics.predictions;
    // Twice: the second is refused on the verdict kept for its schema id.
    produce(&p, topic, b"deep", &deep).await;
    produce(&p, topic, b"deep", &deep).await;
    // Arrays of nulls read no bytes per item: four inner arrays of 1,000 here; forged
    // counts a few kilobytes long would ask for gigabytes.
    let r = register_schema(
        &lane.settings,
        &format!("{}-value", unique("nothing")),
        r#"{"type":"record","name":"Nothing","fields":[{"name":"a","type":{"type":"array","items":{"type":"array","items":"null"}}}]}"#,
    )
    .await;
    let id = u32::try_from(r["id"].as_u64().unwrap()).unwrap();
    let mut nothing = vec![0u8];
    nothing.extend_from_slice(&id.to_be_bytes());
    nothing.push(8); // zigzag 4 outer items
    for _ in 0..4 {
        nothing.extend_from_slice(&[0xd0, 0x0f, 0]); // zigzag 1,000 nulls, end
    }
    nothing.push(0);
    produce(&p, topic, b"nothing", &nothing).await;
    let after = codec
        .encode(topic, &prediction_now("after-deep", 0.7))
        .await
        .unwrap();
    produce(&p, topic, b"after-deep", &after).await;
    let running = lane.start(&[lanes_cache_writer::def()]);
    running.ready().await;
    let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    let letters = consume_n(&dlq, 3, Duration::from_secs(60)).await;
    let mut keys: Vec<_> = letters.iter().map(|l| l.key().unwrap().to_vec()).collect();
    keys.sort();
    assert_eq!(keys, [&b"deep"[..], b"deep", b"nothing"]);
    for letter in letters {
        assert_eq!(class(&letter), ErrorClass::DecodeError);
        let reason = dlq::header_str(letter.headers().unwrap(), dlq::HEADER_MESSAGE).unwrap();
        let expected = match letter.key() {
            Some(b"deep") => "recursive",
            _ => "has an array whose items take no bytes",
        };
        assert!(reason.contains(expected), "{reason}");
    }
    let r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}after-deep", lane.settings.cache_writer.key_prefix);
    wait_for("the next record written", Duration::from_secs(60), || {
        let (mut r, key) = (r.clone(), key.clone());
        async move {
            let score: Option<String> = r.hget(key, "score").await.unwrap();
            (score.as_deref() == Some("0.7")).then_some(())
        }
    })
    .await;
    running.stop().await;
}

/// An event written with a schema registered under a subject the micro-batcher may not
/// read (a registry with rights per subject answers 403): dead-lettered with the reason
/// after a short recheck, and the events after it are scored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_of_a_schema_we_may_not_read_is_dead_lettered_and_the_rest_scored() {
    use lanes_common::records::Record;
    let registry = lanes_tests::rights::RightsRegistry::start().await;
    let mut lane = Lane::new("forbidden");
    lane.settings.registry.url = registry.url.clone();
    lane.settings.micro_batcher.max_delay_ms = 50;
    lane.create_topics().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let topic = lane.settings.topics.events.clone();
    let event = |id: &str| Event {
        event_id: id.to_string(),
        entity_id: format!("card-{id}"),
        kind: "transaction".into(),
        event_time: now_millis(),
        ingested_at: now_millis(),
        features: FEATURES.iter().map(|n| (n.to_string(), 1.0)).collect(),
    };
    // Their schema: ours and one more field, under a subject of their own.
    let mut theirs: serde_json::Value = serde_json::from_str(Event::SCHEMA_JSON).unwrap();
    theirs["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "note", "type": "string", "default": ""}));
    let r = register_schema(
        &lane.settings,
        &format!("{}-value", unique("theirs")),
        &theirs.to_string(),
    )
    .await;
    let id = u32::try_from(r["id"].as_u64().unwrap()).unwrap();
    registry.forbid(id);
    let ours = codec.encode(&topic, &event("hidden")).await.unwrap();
    let mut hidden = vec![0u8];
    hidden.extend_from_slice(&id.to_be_bytes());
    hidden.extend_from_slice(&ours[5..]);
    hidden.push(0); // note: ""

    let p = producer(&lane.settings);
    for (key, value) in [
        (
            "before",
            codec.encode(&topic, &event("before")).await.unwrap(),
        ),
        ("hidden", hidden),
        (
            "after",
            codec.encode(&topic, &event("after")).await.unwrap(),
        ),
    ] {
        produce(&p, &topic, key.as_bytes(), &value).await;
    }
    let running = lane.start(&[lanes_micro_batcher::def(), lanes_scorer::def()]);
    running.ready().await;
    let scored = lane
        .predictions_until(
            &lane.settings.topics.predictions,
            &["before", "after"].map(String::from).into(),
        )
        .await;
    assert!(scored.iter().all(|(_, _, p)| p.event_id != "hidden"));
    let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    let letters = consume_n(&dlq, 1, Duration::from_secs(30)).await;
    assert_eq!(letters[0].key(), Some(&b"hidden"[..]));
    assert_eq!(class(&letters[0]), ErrorClass::UnknownSchemaId);
    let reason = dlq::header_str(letters[0].headers().unwrap(), dlq::HEADER_MESSAGE).unwrap();
    assert!(reason.contains("403"), "{reason}");
    running.stop().await;
}

#[tokio::test]
async fn entries_stay_paired_with_their_keys_when_one_is_gone() {
    let lane = Lane::new("pairing");
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = |e: &str| format!("{}{e}", lane.settings.cache_writer.key_prefix);
    let _: () = r.hset(key("a"), "score", "0.1").await.unwrap();
    let _: () = r.hset(key("a"), "scored_at", "1").await.unwrap();
    let _: () = r.hset(key("c"), "score", "0.3").await.unwrap();
    let _: () = r.hset(key("c"), "scored_at", "3").await.unwrap();
    // "b" expired between the SCAN that listed it and the read.
    let keys = vec![key("a"), key("b"), key("c")];
    let got = cache::entries(&mut r, &keys).await.unwrap();
    let scores: Vec<Option<f64>> = got
        .iter()
        .map(|c| c.as_ref().and_then(|c| c.score))
        .collect();
    assert_eq!(scores, vec![Some(0.1), None, Some(0.3)]);
    let _: () = r.del(&keys).await.unwrap();
}

/// An entry's fields a reader does not use are never read back: an entity whose hash
/// holds a 32 MB `event_id` costs a request or a sweep page the few fields it reads,
/// not the 32 MB (Redis's own count of the bytes it sent says so).
#[tokio::test]
async fn readers_read_only_the_fields_they_use() {
    let lane = Lane::new("read-fields");
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}long-event-id", lane.settings.cache_writer.key_prefix);
    let _: () = r
        .hset_multiple(
            &key,
            &[
                ("score", "0.25".to_string()),
                ("scored_at", "7".into()),
                ("model_version", "1".into()),
                ("event_id", "e".repeat(32 << 20)),
            ],
        )
        .await
        .unwrap();
    let sent = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO stats has total_net_output_bytes")
    };
    let before = sent(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut r)
            .await
            .unwrap(),
    );
    let one = cache::read(&mut r, &key).await.unwrap().expect("an entry");
    let page = cache::entries(&mut r, std::slice::from_ref(&key))
        .await
        .unwrap();
    let after = sent(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut r)
            .await
            .unwrap(),
    );
    assert_eq!(one.score, Some(0.25));
    assert_eq!(one.model_version.as_deref(), Some("1"));
    assert_eq!(page[0].as_ref().and_then(|c| c.score), Some(0.25));
    // Other tests' traffic shares the counter; 32 MB read twice would be 64.
    assert!(
        after - before < 8 << 20,
        "Redis sent {} bytes for two reads of the entry",
        after - before
    );
    let _: () = r.del(&key).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_age_refresh_of_an_entry_lands() {
    let mut lane = Lane::new("refresh-twice");
    let cfg = &mut lane.settings.fallback_responder;
    cfg.freshness_ms = 600_000;
    cfg.refresh_after_ms = 1_000;
    cfg.sweep_interval_ms = 300;
    cfg.sweep_max_per_second = 100;
    lane.create_topics().await;
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}aging", lane.settings.cache_writer.key_prefix);
    let now = now_millis();
    let features: BTreeMap<String, f64> = FEATURES.iter().map(|n| (n.to_string(), 1.0)).collect();
    let seeded = [
        ("score", "0.5".to_string()),
        ("model_name", "fraud".into()),
        ("model_version", "1".into()),
        ("event_time", (now - 5_000).to_string()),
        ("scored_at", (now - 4_000).to_string()),
        ("features", serde_json::to_string(&features).unwrap()),
        ("features_event_time", (now - 5_000).to_string()),
    ];
    let _: () = r.hset_multiple(&key, &seeded).await.unwrap();
    // An entry under an id longer than the cache-writer takes (written before the
    // limit, or by another writer): not re-scored, so not dead-lettered on every pass.
    let long = format!(
        "{}{}",
        lane.settings.cache_writer.key_prefix,
        "l".repeat(513)
    );
    let _: () = r.hset_multiple(&long, &seeded).await.unwrap();
    let running = lane.start(&[lanes_fallback_responder::def(), lanes_cache_writer::def()]);
    running.ready().await;
    // Each sweep refresh re-scores the same features (same event time); each must land,
    // so scored_at moves on every time the entry ages past refresh_after_ms again.
    let seen = std::sync::Mutex::new(HashSet::new());
    wait_for("three refreshes land", Duration::from_secs(60), || {
        let (mut r, key, seen) = (r.clone(), key.clone(), &seen);
        async move {
            let at: Option<String> = r.hget(&key, "scored_at").await.unwrap();
            let mut seen = seen.lock().unwrap();
            seen.insert(at?);
            (seen.len() >= 4).then_some(())
        }
    })
    .await;
    assert_eq!(
        running.metric("lanes_cache_writer_dead_letters_total", &[]),
        0.0
    );
    let at: String = r.hget(&long, "scored_at").await.unwrap();
    assert_eq!(at, seeded[4].1, "the long id's entry is left as it was");
    let _: () = r.del(&[&key, &long]).await.unwrap();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_series_of_partitions_that_moved_are_removed() {
    let lane = Lane::new("lag-series");
    lane.create_topics().await;
    // Lag is known once a partition has records: put some in each.
    let lines: Vec<String> = (0..60)
        .map(|i| raw(&format!("card-{i}"), now_millis(), 1.0))
        .collect();
    lane.publish_raw(&producer(&lane.settings), &lines).await;
    let first = lane.start(&[lanes_ingest::def()]);
    first.ready().await;
    let series = |running: &Running| {
        running
            .metrics
            .gather()
            .iter()
            .filter(|f| f.name() == "lanes_consumer_lag_messages")
            .flat_map(|f| f.get_metric().to_vec())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "topic" && l.value() == lane.settings.topics.raw)
            })
            .count()
    };
    wait_for(
        "lag of all 3 partitions",
        Duration::from_secs(30),
        || async { (series(&first) == 3).then_some(()) },
    )
    .await;
    let second = lane.start(&[lanes_ingest::def()]);
    second.ready().await;
    wait_for(
        "the first replica reports only what it holds",
        Duration::from_secs(60),
        || async {
            let (a, b) = (series(&first), series(&second));
            eprintln!("lag series: first {a}, second {b}");
            (a < 3 && b >= 1 && a + b == 3).then_some(())
        },
    )
    .await;
    second.stop().await;
    first.stop().await;
}

/// Events that each land in the cache under their own entity.
fn samples(seed: u64, n: usize) -> Vec<Sample> {
    Generator::new(seed, n).take(n).collect()
}

/// Publishes `during` over 60 s (longer than max.poll.interval.ms, 30 s: a member that
/// stopped polling would be evicted) while a dependency is down, then checks that no
/// service stopped and no member left its group.
async fn outage(lane: &Lane, running: &Running, during: &[Sample], rebalances: f64) {
    let p = producer(&lane.settings);
    for chunk in during.chunks(during.len().div_ceil(20)) {
        lane.publish_raw(&p, &chunk.iter().map(Sample::raw_json).collect::<Vec<_>>())
            .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    for (task, _, handle) in &running.tasks {
        assert!(!handle.is_finished(), "{task} stopped during the outage");
    }
    assert_eq!(
        running.metric("lanes_consumer_rebalances_total", &[]),
        rebalances,
        "every member stayed in its group"
    );
}

async fn all_cached(lane: &Lane, entities: &HashSet<String>) -> bool {
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = entities
        .iter()
        .map(|e| cache::key(&lane.settings.cache_writer.key_prefix, e))
        .collect();
    let got = cache::entries(&mut r, &keys).await.unwrap();
    got.iter()
        .all(|c| c.as_ref().is_some_and(|c| c.score.is_some()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_for_a_minute_while_events_flow_loses_nothing() {
    let port = free_port();
    let mut redis_proc = redis_server(port);
    let mut lane = Lane::new("redis-minute");
    lane.settings.redis.url = format!("redis://127.0.0.1:{port}");
    lane.create_topics().await;
    let running = lane.start(&streaming_services());
    running.ready().await;
    let p = producer(&lane.settings);
    let before = samples(31, 50);
    lane.publish_raw(&p, &before.iter().map(Sample::raw_json).collect::<Vec<_>>())
        .await;
    let entities: HashSet<String> = before.iter().map(|s| s.entity_id.clone()).collect();
    wait_for(
        "the first events cached",
        Duration::from_secs(60),
        || async { all_cached(&lane, &entities).await.then_some(()) },
    )
    .await;

    let rebalances = running.metric("lanes_consumer_rebalances_total", &[]);
    signal(&redis_proc.0, "KILL");
    redis_proc.0.wait().unwrap();
    let during = samples(32, 400);
    outage(&lane, &running, &during, rebalances).await;
    redis_proc = redis_server(port);
    let entities: HashSet<String> = during.iter().map(|s| s.entity_id.clone()).collect();
    // The Redis came back empty: every event published during the outage must land.
    wait_for(
        "every event of the outage cached",
        Duration::from_secs(120),
        || async { all_cached(&lane, &entities).await.then_some(()) },
    )
    .await;
    assert_eq!(
        running.metric("lanes_cache_writer_dead_letters_total", &[]),
        0.0
    );
    assert_eq!(running.metric("lanes_ingest_dead_letters_total", &[]), 0.0);
    running.stop().await;
    drop(redis_proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_down_for_a_minute_loses_nothing_and_a_late_schema_id_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut lane = Lane::new("registry-minute");
    lane.settings.schema_registry.listen = format!("127.0.0.1:{port}");
    lane.settings.schema_registry.data_dir = dir.path().to_path_buf();
    lane.settings.registry.url = format!("http://127.0.0.1:{port}");
    lane.settings.registry.timeout_ms = 1_000;
    lane.create_topics().await;

    // An Event written with schema id 1 before the registry has it: a producer that
    // registered through another registry replica a moment ago.
    let shared = AvroCodec::new(&settings().registry).unwrap();
    let sample = samples(41, 1).remove(0);
    let early = lanes_common::records::Event {
        event_id: sample.event_id.clone(),
        entity_id: sample.entity_id.clone(),
        kind: "transaction".into(),
        event_time: now_millis(),
        ingested_at: now_millis(),
        features: sample.feature_map().into(),
    };
    let mut bytes = shared.encode(&unique("elsewhere"), &early).await.unwrap();
    bytes[1..5].copy_from_slice(&1u32.to_be_bytes());
    let p = producer(&lane.settings);
    produce(
        &p,
        &lane.settings.topics.events,
        early.entity_id.as_bytes(),
        &bytes,
    )
    .await;

    let mut registry = lane.spawn("lanes-schema-registry", &[]);
    wait_for("the registry", Duration::from_secs(30), || async {
        http()
            .get(format!("{}/subjects", lane.settings.registry.url))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    let running = lane.start(&streaming_services());
    running.ready().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let subject = format!("{}-value", lane.settings.topics.events);
    let r = register_schema(
        &lane.settings,
        &subject,
        <Event as lanes_common::records::Record>::SCHEMA_JSON,
    )
    .await;
    assert_eq!(r["id"], 1, "{r}");
    let mut entities: HashSet<String> = HashSet::from([early.entity_id.clone()]);
    wait_for(
        "the early event cached",
        Duration::from_secs(60),
        || async { all_cached(&lane, &entities).await.then_some(()) },
    )
    .await;

    // Down for a minute while events flow: nothing exits, nothing is dead-lettered.
    let rebalances = running.metric("lanes_consumer_rebalances_total", &[]);
    signal(&registry, "KILL");
    registry.wait().unwrap();
    let during = samples(42, 300);
    outage(&lane, &running, &during, rebalances).await;
    let _registry = lane.spawn("lanes-schema-registry", &[]);
    entities.extend(during.iter().map(|s| s.entity_id.clone()));
    wait_for("every event cached", Duration::from_secs(120), || async {
        all_cached(&lane, &entities).await.then_some(())
    })
    .await;
    let dead: f64 = ["ingest", "micro_batcher", "scorer", "cache_writer"]
        .iter()
        .map(|service| running.metric(&format!("lanes_{service}_dead_letters_total"), &[]))
        .sum();
    if dead > 0.0 {
        let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
        for m in consume_n(&dlq, dead as usize, Duration::from_secs(30)).await {
            let h = m.headers().unwrap();
            eprintln!(
                "dead letter: {:?} {:?} {:?}",
                dlq::header_str(h, dlq::HEADER_STAGE),
                dlq::header_str(h, dlq::HEADER_CLASS),
                dlq::header_str(h, dlq::HEADER_MESSAGE)
            );
        }
    }
    assert_eq!(dead, 0.0, "nothing is dead-lettered");
    running.stop().await;
    delete_entries(&lane.settings, &entities).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_payloads_are_not_logged_at_info() {
    let mut lane = Lane::new("quiet-logs");
    lane.settings.log.level = "info".into();
    lane.create_topics().await;
    let mut ingest = Proc(
        std::process::Command::new(bin("lanes-ingest"))
            .envs(lane.env())
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let marker = "card-4111-1111-1111-1111";
    let lines = [
        format!(r#"{{"entity_id":"{marker}","features":{{"{marker}":1}}}}"#),
        format!(r#"{{"entity_id":"{marker}","event_time":"{marker}"}}"#),
        format!("not json {marker}"),
    ];
    lane.publish_raw(&producer(&lane.settings), &lines).await;
    let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    consume_n(&dlq, 3, Duration::from_secs(60)).await;
    signal(&ingest, "TERM");
    let out = tokio::task::spawn_blocking(move || {
        let child = std::mem::replace(
            &mut ingest.0,
            std::process::Command::new("true").spawn().unwrap(),
        );
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.contains("dead-lettered"),
        "the letters are logged: {logs}"
    );
    assert!(
        !logs.contains(marker),
        "a payload reached the info log: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_redis_trips_the_sweep_into_the_breaker_and_shutdown_still_ends_it() {
    let port = free_port();
    let redis_proc = redis_server(port);
    let mut lane = Lane::new("sweep-hung");
    lane.settings.redis.url = format!("redis://127.0.0.1:{port}");
    let cfg = &mut lane.settings.fallback_responder;
    cfg.sweep_interval_ms = 200;
    cfg.sample_interval_ms = 200;
    cfg.redis_timeout_ms = 100;
    cfg.breaker_failures = 2;
    cfg.breaker_open_ms = 60_000;
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    // Redis stops answering but keeps its connections: only a timeout notices.
    signal(&redis_proc.0, "STOP");
    // The breaker opens (1) on the background reads alone.
    running
        .wait_metric("lanes_fallback_responder_cache_breaker_state", &[], 1.0)
        .await;
    let stopped = std::time::Instant::now();
    running.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the sweep let shutdown wait {:?}",
        stopped.elapsed()
    );
    signal(&redis_proc.0, "CONT");
}

/// Micro-batches of 900,000 empty event ids, written straight to the batch topic: each
/// is under a megabyte on the wire and 21 MB of strings decoded. A backlog of them (held
/// up behind a slow registry, as after any outage) is decoded one record at a time, so
/// the scorer's peak memory stays near one record's worth above its own; decoded a
/// prefetch's worth at once (eight or nine), they took it past 250 MiB, and with the
/// in-flight limit at its 64 MiB default, to gigabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_records_that_decode_large_is_decoded_one_at_a_time() {
    use lanes_common::records::{CloseReason, MicroBatch};
    use lanes_tests::fleet::Fleet;

    let mut lane = Lane::new("decode-large");
    // The raw bytes in flight, kept small so that what is decoded shows.
    lane.settings.runner.max_in_flight_bytes = 8 << 20;
    lane.create_topics().await;
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let registry = lane.settings.registry.url.trim_start_matches("http://");
    let proxy = lanes_tests::proxy::SlowProxy::start(registry.trim_end_matches('/')).await;
    let mut slow = lane.clone();
    slow.settings.registry.url = format!("http://{}", proxy.addr);
    let p = producer(&lane.settings);
    let topic = &lane.settings.topics.batches;
    let large = MicroBatch {
        batch_id: "large".into(),
        source_partition: 0,
        first_offset: 0,
        last_offset: 0,
        opened_at: 1,
        closed_at: 2,
        close_reason: CloseReason::Count,
        feature_names: FEATURES.iter().map(|f| f.to_string()).collect(),
        features: Vec::new(),
        event_ids: vec![String::new(); 900_000],
        entity_ids: Vec::new(),
        kinds: Vec::new(),
        event_times: Vec::new(),
        ingested_ats: Vec::new(),
    };
    let bytes = codec.encode(topic, &large).await.unwrap();
    assert!(bytes.len() < 1_000_000, "{} bytes", bytes.len());
    // A batch that scores: its schema id is then known as the scorer's own, read
    // straight into the record (the generic path refuses arrays over 16 MiB of values).
    let good = MicroBatch {
        batch_id: "good".into(),
        features: vec![1.0; FEATURES.len()],
        event_ids: vec!["good-e".into()],
        entity_ids: vec!["good".into()],
        kinds: vec!["transaction".into()],
        event_times: vec![now_millis()],
        ingested_ats: vec![now_millis()],
        ..large.clone()
    };
    let good = codec.encode(topic, &good).await.unwrap();
    let fleet = Fleet::start(&slow, &[lanes_scorer::def()]).await;
    // The scorer's first record waits for its writer schema while the rest arrive.
    proxy.set_delay(Duration::from_secs(3));
    produce(&p, topic, b"good", &good).await;
    let n = 30;
    for i in 0..n {
        produce(&p, topic, format!("large-{i}").as_bytes(), &bytes).await;
    }
    let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    let letters = consume_n(&dlq, n, Duration::from_secs(120)).await;
    for m in &letters {
        assert_eq!(class(m), ErrorClass::DecodeError);
    }
    let peak = fleet.stop().await["scorer"];
    eprintln!("scorer peak RSS {peak:.0} MiB");
    assert!(peak < 200.0, "scorer peak RSS {peak:.0} MiB");
}
