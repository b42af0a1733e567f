//! Interop with a client nobody here wrote: Confluent's Python `AvroSerializer` and
//! `AvroDeserializer` (confluent-kafka) against Lanes' Rust codec, over the real broker
//! and registry.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use lanes_common::avro::AvroCodec;
use lanes_common::features::Features;
use lanes_common::records::{Event, Record};
use lanes_tests::*;
use rdkafka::consumer::Consumer;

fn python(args: &[&str]) -> serde_json::Value {
    let script = root().join("tests/interop/confluent_avro.py");
    let out = Command::new(lanes_tests::python())
        .arg(&script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("python printed a result")).unwrap()
}

fn sample() -> Event {
    Event {
        event_id: "e-py-1".into(),
        entity_id: "card-7".into(),
        kind: "transaction".into(),
        event_time: 1_795_000_000_000,
        ingested_at: 1_795_000_000_250,
        features: Features::from([
            ("amount".into(), 99.75),
            ("hour".into(), 23.0),
            ("merchant_risk".into(), 0.125),
        ]),
    }
}

#[tokio::test]
async fn rust_decodes_what_confluent_python_encoded() {
    let s = settings();
    let topic = unique("interop-py2rs");
    create_topics(&s, &[&topic]).await;
    let expected = sample();
    let schema_file = root().join("schemas/Event.avsc");
    let record = serde_json::to_string(&expected).unwrap();
    let bootstrap = s.kafka.bootstrap_servers.clone();
    let registry = s.registry.url.clone();
    let (t, sf) = (topic.clone(), schema_file.display().to_string());
    let produced = tokio::task::spawn_blocking(move || {
        python(&["produce", &bootstrap, &registry, &t, &sf, &record])
    })
    .await
    .unwrap();
    let python_id = produced["schema_id"].as_u64().unwrap() as u32;

    let consumer = consumer(&s, &[&topic]);
    let m = consume_n(&consumer, 1, Duration::from_secs(60))
        .await
        .remove(0);
    let codec = AvroCodec::new(&s.registry).unwrap();
    let decoded = codec.decode::<Event>(payload(&m)).await.unwrap();
    assert_eq!(decoded.record, expected);
    assert_eq!(decoded.schema_id, python_id);

    // Both clients registering the same .avsc land on one id.
    let rust_bytes = codec.encode(&topic, &expected).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(rust_bytes[1..5].try_into().unwrap()),
        python_id
    );
    assert!(Event::SCHEMA_JSON.contains("lanes.v1"));
}

#[tokio::test]
async fn confluent_python_decodes_what_rust_encoded() {
    let s = settings();
    let topic = unique("interop-rs2py");
    create_topics(&s, &[&topic]).await;
    let sent = sample();
    let codec = AvroCodec::new(&s.registry).unwrap();
    let bytes = codec.encode(&topic, &sent).await.unwrap();
    produce(&producer(&s), &topic, sent.entity_id.as_bytes(), &bytes).await;

    let bootstrap = s.kafka.bootstrap_servers.clone();
    let registry = s.registry.url.clone();
    let t = topic.clone();
    let got = tokio::task::spawn_blocking(move || python(&["consume", &bootstrap, &registry, &t]))
        .await
        .unwrap();
    assert_eq!(got, serde_json::to_value(&sent).unwrap());
}

/// `schemas/Event.avsc` as another writer has it, changed by `edit`, saved in `dir`.
fn event_schema(
    dir: &std::path::Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<serde_json::Value>),
) -> String {
    let mut schema: serde_json::Value = serde_json::from_str(Event::SCHEMA_JSON).unwrap();
    edit(schema["fields"].as_array_mut().unwrap());
    let path = dir.join(name);
    std::fs::write(&path, schema.to_string()).unwrap();
    path.display().to_string()
}

fn without(fields: &mut Vec<serde_json::Value>, names: &[&str]) {
    fields.retain(|f| !names.contains(&f["name"].as_str().unwrap()));
}

/// Confluent's Python serializer writes the `[schema file, record]` pairs of the JSON
/// array `pairs` to `topic`, in order (Python reads `NaN` in it too).
async fn python_produce(s: &lanes_common::Settings, topic: &str, pairs: String) {
    let args = [
        "produce-each".to_string(),
        s.kafka.bootstrap_servers.clone(),
        s.registry.url.clone(),
        topic.to_string(),
        pairs,
    ];
    tokio::task::spawn_blocking(move || {
        python(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
}

/// Predictions on the lane's topic until every id in `ids` has one.
async fn predictions_for(
    lane: &Lane,
    ids: &[&str],
) -> BTreeMap<String, lanes_common::records::Prediction> {
    let wanted = ids.iter().map(|id| id.to_string()).collect();
    lane.predictions_until(&lane.settings.topics.predictions, &wanted)
        .await
        .into_iter()
        .map(|(_, _, p)| (p.event_id.clone(), p))
        .collect()
}

fn event_json(id: &str, features: &BTreeMap<String, f64>) -> serde_json::Value {
    serde_json::json!({
        "event_id": id,
        "entity_id": format!("entity-{id}"),
        "kind": "transaction",
        "event_time": lanes_common::records::now_millis() - 1_000,
        "ingested_at": 0,
        "features": features,
    })
}

/// Schema evolution on a stream Lanes consumes: with the events subject at FULL
/// compatibility, Confluent's Python serializer writes an `Event` from an older writer
/// (no `kind`, which Lanes' reader schema defaults) and one from a newer writer (an
/// optional field Lanes does not know) to the same topic as Lanes' own. Every consumer
/// resolves each writer's schema to its own: all three are scored, none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_compatible_event_changes_are_processed_not_dead_lettered() {
    let lane = Lane::new("evolve");
    let s = lane.settings.clone();
    lane.create_topics().await;
    let subject = format!("{}-value", s.topics.events);
    let set = http()
        .put(format!("{}/config/{subject}", s.registry.url))
        .json(&serde_json::json!({"compatibility": "FULL"}))
        .send()
        .await
        .unwrap();
    assert!(set.status().is_success(), "{:?}", set.text().await);
    let running = lane.start(&streaming_services());
    running.ready().await;

    let features = lanes_common::generator::Generator::new(3, 10)
        .next_sample()
        .feature_map();
    let codec = AvroCodec::new(&s.registry).unwrap();
    let current: Event =
        serde_json::from_value(event_json("current", &features)).expect("an Event");
    let bytes = codec.encode(&s.topics.events, &current).await.unwrap();
    produce(&producer(&s), &s.topics.events, b"entity-current", &bytes).await;

    let dir = tempfile::tempdir().unwrap();
    let newer = event_schema(dir.path(), "newer.avsc", |f| {
        f.push(serde_json::json!({"name": "channel", "type": ["null", "string"], "default": null}))
    });
    let older = event_schema(dir.path(), "older.avsc", |f| without(f, &["kind"]));
    let mut with_channel = event_json("newer", &features);
    with_channel["channel"] = "web".into();
    let mut no_kind = event_json("older", &features);
    no_kind.as_object_mut().unwrap().remove("kind");
    python_produce(
        &s,
        &s.topics.events,
        serde_json::json!([[newer, with_channel], [older, no_kind]]).to_string(),
    )
    .await;

    let scored = predictions_for(&lane, &["current", "newer", "older"]).await;
    assert_eq!(scored.len(), 3);
    assert_eq!(
        running.metric("lanes_micro_batcher_dead_letters_total", &[]),
        0.0
    );
    // A reader of the topic gets the writer's fields resolved to Lanes' schema.
    let reader = consumer(&s, &[&s.topics.events]);
    let mut kinds = BTreeMap::new();
    for m in consume_n(&reader, 3, Duration::from_secs(30)).await {
        let e = codec.decode::<Event>(payload(&m)).await.unwrap().record;
        assert_eq!(e.features, Features::from(features.clone()));
        kinds.insert(e.event_id, e.kind);
    }
    assert_eq!(kinds["older"], "event", "the reader's default");
    assert_eq!(kinds["newer"], "transaction");
    running.stop().await;
}

/// Publishers that already speak Avro write `Event`s with Confluent's serializer
/// (TopicNameStrategy, subject `<avro_events>-value`) to `topics.avro_events`, and
/// ingest takes them without the raw-JSON step: good ones are scored (with ingest's
/// own `ingested_at`), bad ones go to the dead-letter topic with the classes raw JSON
/// gets, and neither kind holds up the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn avro_publishers_events_are_validated_like_raw_json_and_scored() {
    use lanes_common::dlq::{self, ErrorClass};
    let lane = Lane::new("avropub");
    let s = lane.settings.clone();
    lane.create_topics().await;
    let running = lane.start(&streaming_services());
    running.ready().await;

    let features = lanes_common::generator::Generator::new(5, 10)
        .next_sample()
        .feature_map();
    let now = lanes_common::records::now_millis();
    let schema = root().join("schemas/Event.avsc").display().to_string();
    let event = |id: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut e = event_json(id, &features);
        edit(&mut e);
        serde_json::json!([schema, e])
    };
    let first_feature = features.keys().next().unwrap().clone();
    let good = [
        event("pub-ok", &|_| {}),
        // Publishers may leave ingested_at out: its default, replaced by ingest.
        event("pub-no-ingested-at", &|e| {
            e.as_object_mut().unwrap().remove("ingested_at");
        }),
    ];
    let bad = [
        (
            event("pub-unknown", &|e| e["features"]["age"] = 1.0.into()),
            ErrorClass::UnknownFeature,
        ),
        (
            event("pub-missing", &|e| {
                e["features"]
                    .as_object_mut()
                    .unwrap()
                    .remove(&first_feature);
            }),
            ErrorClass::MissingField,
        ),
        (
            event("pub-nan", &|e| {
                e["features"][&first_feature] = "__nan__".into()
            }),
            ErrorClass::NonFinite,
        ),
        (
            event("pub-future", &|e| {
                e["event_time"] = (now + 3_600_000).into()
            }),
            ErrorClass::InvalidEventTime,
        ),
        (
            event("pub-no-entity", &|e| e["entity_id"] = "".into()),
            ErrorClass::MissingField,
        ),
        (
            event("pub-large", &|e| e["kind"] = "k".repeat(70_000).into()),
            ErrorClass::TooLarge,
        ),
    ];
    let mut pairs: Vec<serde_json::Value> = bad.iter().map(|(p, _)| p.clone()).collect();
    pairs.extend(good.iter().cloned());
    let pairs = serde_json::Value::from(pairs)
        .to_string()
        .replace("\"__nan__\"", "NaN");
    python_produce(&s, &s.topics.avro_events, pairs).await;
    // Bytes without Confluent framing on the Avro topic.
    let raw = br#"{"entity_id":"pub-json","features":{}}"#;
    produce(&producer(&s), &s.topics.avro_events, b"pub-json", raw).await;

    let scored = predictions_for(&lane, &["pub-ok", "pub-no-ingested-at"]).await;
    assert_eq!(scored.len(), 2);

    let codec = AvroCodec::new(&s.registry).unwrap();
    let reader = consumer(&s, &[&s.topics.dlq]);
    let mut classes = BTreeMap::new();
    for m in consume_n(&reader, bad.len() + 1, Duration::from_secs(60)).await {
        let h = rdkafka::message::Message::headers(&m).expect("dead letters carry headers");
        let class: ErrorClass = dlq::header_str(h, dlq::HEADER_CLASS)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(dlq::header_str(h, dlq::HEADER_STAGE), Some("ingest"));
        assert_eq!(
            dlq::header_str(h, dlq::HEADER_SOURCE_TOPIC),
            Some(s.topics.avro_events.as_str())
        );
        let id = match codec.decode::<Event>(payload(&m)).await {
            Ok(d) => d.record.event_id,
            Err(_) => String::from_utf8_lossy(payload(&m)).into_owned(),
        };
        classes.insert(id, class);
    }
    for (pair, class) in &bad {
        let id = pair[1]["event_id"].as_str().unwrap();
        assert_eq!(classes.get(id), Some(class), "{id}: {classes:?}");
    }
    let json = String::from_utf8_lossy(raw).into_owned();
    assert_eq!(classes.get(&json), Some(&ErrorClass::InvalidMagicByte));

    // What reaches `events` is ingest's: its arrival time, not the publisher's.
    let events = consumer(&s, &[&s.topics.events]);
    for m in consume_n(&events, 2, Duration::from_secs(30)).await {
        let e = codec.decode::<Event>(payload(&m)).await.unwrap().record;
        assert!(e.ingested_at >= now, "{e:?}");
        assert_eq!(e.features, Features::from(features.clone()));
    }
    let avro = |outcome| {
        running.metric(
            "lanes_ingest_events_total",
            &[("format", "avro"), ("outcome", outcome)],
        )
    };
    assert_eq!(avro("valid"), 2.0);
    assert_eq!(avro("dead_letter"), (bad.len() + 1) as f64);
    assert_eq!(
        running.metric(
            "lanes_ingest_events_total",
            &[("format", "json"), ("outcome", "valid")]
        ),
        0.0
    );
    running.stop().await;
}

/// With `ingest.avro = false` ingest neither reads nor creates the Avro topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_without_its_avro_loop_creates_no_avro_topic() {
    let mut lane = Lane::new("no-avro");
    lane.settings.ingest.avro = false;
    let running = lane.start(&[lanes_ingest::def()]);
    running.ready().await;
    let s = &lane.settings;
    let probe = metadata_probe(s);
    let md = probe.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let names: Vec<&str> = md.topics().iter().map(|t| t.name()).collect();
    assert!(
        names.contains(&s.topics.raw.as_str()),
        "ingest created its input"
    );
    assert!(
        !names.contains(&s.topics.avro_events.as_str()),
        "{} was created with the Avro loop off",
        s.topics.avro_events
    );
    running.stop().await;
}
