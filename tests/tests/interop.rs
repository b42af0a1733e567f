//! Interop with a client nobody here wrote: Confluent's Python `AvroSerializer` and
//! `AvroDeserializer` (confluent-kafka) against Lanes' Rust codec, over the real broker
//! and registry.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use lanes_common::avro::AvroCodec;
use lanes_common::records::{Event, Record};
use lanes_tests::*;

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
        features: BTreeMap::from([
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
