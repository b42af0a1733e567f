//! Avro over the real broker and registry: round trips, schema ids, poison versus
//! transient decode failures, and the schema-id caches.

use std::sync::Arc;
use std::time::Duration;

use lanes_common::avro::{AvroCodec, DecodeError};
use lanes_common::config::RegistryConfig;
use lanes_common::dlq::ErrorClass;
use lanes_common::records::Event;
use lanes_tests::*;
use rdkafka::Message;

fn event(n: usize) -> Event {
    Event {
        event_id: format!("e-{n}"),
        entity_id: format!("card-{}", n % 7),
        kind: "transaction".into(),
        event_time: 1_795_000_000_000 + n as i64,
        ingested_at: 1_795_000_000_500 + n as i64,
        features: [
            ("amount".to_string(), 12.5 * n as f64),
            ("hour".to_string(), 10.0),
            ("neg".to_string(), -1e-9),
        ]
        .into(),
    }
}

#[tokio::test]
async fn event_roundtrips_through_broker_with_a_registry_schema_id() {
    let s = settings();
    let topic = unique("events");
    create_topics(&s, &[&topic]).await;
    let codec = AvroCodec::new(&s.registry).unwrap();
    let producer = producer(&s);
    let sent: Vec<Event> = (0..5).map(event).collect();
    for e in &sent {
        let bytes = codec.encode(&topic, e).await.unwrap();
        produce(&producer, &topic, e.entity_id.as_bytes(), &bytes).await;
    }

    // The id in the frames is the one the registry holds for `<topic>-value`.
    let latest: serde_json::Value = http()
        .get(format!(
            "{}/subjects/{topic}-value/versions/latest",
            s.registry.url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let registry_id = latest["id"].as_u64().expect("subject registered") as u32;

    let consumer = consumer(&s, &[&topic]);
    let mut got: Vec<Event> = Vec::new();
    for m in consume_n(&consumer, sent.len(), Duration::from_secs(60)).await {
        let decoded = codec.decode::<Event>(payload(&m)).await.unwrap();
        assert_eq!(decoded.schema_id, registry_id);
        assert_eq!(m.key(), Some(decoded.record.entity_id.as_bytes()));
        got.push(decoded.record);
    }
    got.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert_eq!(got, sent);
}

#[tokio::test]
async fn poison_is_classified_by_cause() {
    let s = settings();
    let topic = unique("poison");
    let codec = AvroCodec::new(&s.registry).unwrap();
    let good = codec.encode(&topic, &event(1)).await.unwrap();

    let class = |r: Result<_, DecodeError>| match r {
        Err(DecodeError::Poison { class, .. }) => class,
        other => panic!("expected poison, got {other:?}"),
    };
    let mut wrong_magic = good.clone();
    wrong_magic[0] = 7;
    assert_eq!(
        class(codec.decode::<Event>(&wrong_magic).await),
        ErrorClass::InvalidMagicByte
    );
    assert_eq!(
        class(
            codec
                .decode::<Event>(br#"{"event_id":"json on an Avro topic"}"#)
                .await
        ),
        ErrorClass::InvalidMagicByte
    );

    let truncated = &good[..good.len() - 6];
    assert_eq!(
        class(codec.decode::<Event>(truncated).await),
        ErrorClass::DecodeError
    );
    assert_eq!(
        class(codec.decode::<Event>(&good[..3]).await),
        ErrorClass::DecodeError
    );

    // An id the registry does not know is asked for again for a few seconds (it may be
    // registered a moment after the record was written), then it is poison, and stays
    // so without asking until the negative entry expires.
    let mut unknown = good.clone();
    unknown[1..5].copy_from_slice(&0x7fff_fff0u32.to_be_bytes());
    assert!(
        codec
            .decode::<Event>(&unknown)
            .await
            .unwrap_err()
            .is_transient()
    );
    let started = std::time::Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    assert_eq!(
        class(codec.decode_retrying::<Event>(&unknown, &stop).await),
        ErrorClass::UnknownSchemaId
    );
    let waited = started.elapsed();
    assert!(
        waited >= lanes_common::avro::UNKNOWN_ID_RECHECK - Duration::from_millis(500)
            && waited < Duration::from_secs(15),
        "rechecked for {waited:?}"
    );
    let started = std::time::Instant::now();
    assert_eq!(
        class(codec.decode::<Event>(&unknown).await),
        ErrorClass::UnknownSchemaId
    );
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "no registry call while known missing"
    );

    // The untouched bytes still decode: the codec holds no poisoned state.
    assert_eq!(codec.decode::<Event>(&good).await.unwrap().record, event(1));
}

#[tokio::test]
async fn an_unreachable_registry_is_transient() {
    let s = settings();
    let good = AvroCodec::new(&s.registry)
        .unwrap()
        .encode(&unique("t"), &event(2))
        .await
        .unwrap();
    let cfg = RegistryConfig {
        url: format!("http://{}", dead_address()),
        timeout_ms: 1000,
        ..s.registry.clone()
    };
    let offline = AvroCodec::new(&cfg).unwrap();
    let err = offline.decode::<Event>(&good).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let err = offline.encode(&unique("t"), &event(3)).await.unwrap_err();
    assert!(err.retriable, "{err}");
}

#[tokio::test]
async fn schema_ids_are_cached_after_first_use() {
    // A registry of our own, so the test can take it away.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let token = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(lanes_schema_registry::run(
        listener,
        Arc::new(lanes_schema_registry::Store::in_memory()),
        token.clone(),
    ));
    let cfg = RegistryConfig {
        url,
        ..settings().registry
    };
    let writer = AvroCodec::new(&cfg).unwrap();
    let reader = AvroCodec::new(&cfg).unwrap();
    let topic = unique("cache");
    let first = writer.encode(&topic, &event(4)).await.unwrap();
    assert_eq!(
        reader.decode::<Event>(&first).await.unwrap().record,
        event(4)
    );

    token.cancel();
    server.await.unwrap().unwrap();

    // With the registry gone, both directions still work from the caches.
    let second = writer.encode(&topic, &event(5)).await.unwrap();
    assert_eq!(second[..5], first[..5], "same schema id");
    assert_eq!(
        reader.decode::<Event>(&second).await.unwrap().record,
        event(5)
    );
    // A codec that never saw the id has nothing cached and must ask.
    assert!(
        AvroCodec::new(&cfg)
            .unwrap()
            .decode::<Event>(&second)
            .await
            .unwrap_err()
            .is_transient()
    );
}

/// A registry with rights per subject answers 403 to a schema id registered under a
/// subject this service may not read. That is the record's, not the registry's: taken
/// as passing, one such record would hold up its partition for good.
#[tokio::test]
async fn a_schema_id_the_registry_will_not_let_us_read_is_poison_after_a_recheck() {
    let registry = lanes_tests::rights::RightsRegistry::start().await;
    let cfg = RegistryConfig {
        url: registry.url.clone(),
        ..settings().registry
    };
    let writer = AvroCodec::new(&cfg).unwrap();
    let refused = writer.encode(&unique("theirs"), &event(6)).await.unwrap();
    let id = u32::from_be_bytes(refused[1..5].try_into().unwrap());
    registry.forbid(id);

    let reader = AvroCodec::new(&cfg).unwrap();
    let first = reader.decode::<Event>(&refused).await.unwrap_err();
    assert!(first.is_transient(), "{first:?}");
    let started = std::time::Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    let decoded = tokio::time::timeout(
        Duration::from_secs(20),
        reader.decode_retrying::<Event>(&refused, &stop),
    )
    .await
    .expect("refused within 20 s, not retried for good");
    match decoded {
        Err(DecodeError::Poison { class, message }) => {
            assert_eq!(class, ErrorClass::UnknownSchemaId);
            assert!(
                message.contains(&format!("schema id {id}")) && message.contains("403"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= lanes_common::avro::UNKNOWN_ID_RECHECK - Duration::from_millis(500)
            && waited < Duration::from_secs(15),
        "rechecked for {waited:?}"
    );

    // Other ids are read as before.
    let prediction = writer
        .encode(&unique("ours"), &prediction_now("e", 0.5))
        .await
        .unwrap();
    assert_eq!(
        reader
            .decode::<lanes_common::records::Prediction>(&prediction)
            .await
            .unwrap()
            .record
            .entity_id,
        "e"
    );
}
