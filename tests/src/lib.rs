//! Test harness for Lanes' end-to-end tests: everything a test needs to talk to the real
//! local stack (`scripts/dev-up.sh`) in one place. Each test uses its own random topic
//! and group names, so tests run in parallel against one broker.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use lanes_common::Settings;
use lanes_common::kafka::LoggingContext;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// The stack's settings: defaults, overridden by `LANES__...` variables when set.
pub fn settings() -> Settings {
    Settings::load(None).expect("test settings load")
}

/// A name no other test or run uses: `lanes-test-<what>-<random>`.
pub fn unique(what: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("lanes-test-{what}-{}", &id[..12])
}

/// Polls `probe` until it yields `Some`, failing the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates `topics` with the configured partition count.
pub async fn create_topics(settings: &Settings, topics: &[&str]) {
    lanes_common::kafka::ensure_topics(&settings.kafka, topics)
        .await
        .expect("topics are created");
}

pub fn producer(settings: &Settings) -> FutureProducer {
    lanes_common::kafka::producer(&settings.kafka, "lanes-test").expect("producer")
}

/// Produces one record and waits for its acknowledgement.
pub async fn produce(producer: &FutureProducer, topic: &str, key: &[u8], value: &[u8]) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(value),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("record acknowledged");
}

/// The consumer tests use: the services' own factory, in a fresh group.
pub type TestConsumer = StreamConsumer<LoggingContext>;

/// A consumer in a fresh group, subscribed to `topics`, reading from the start.
pub fn consumer(settings: &Settings, topics: &[&str]) -> TestConsumer {
    let c = lanes_common::kafka::consumer(
        &settings.kafka,
        "lanes-test",
        &unique("group"),
        LoggingContext::default(),
    )
    .expect("consumer");
    c.subscribe(topics).expect("subscribe");
    c
}

/// Receives `n` messages, failing the test after `timeout`.
pub async fn consume_n(consumer: &TestConsumer, n: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("consume failed: {e}"),
            Err(_) => panic!("received {} of {n} messages within {timeout:?}", out.len()),
        }
    }
    out
}

/// The payload of a message, which must have one.
pub fn payload(m: &OwnedMessage) -> &[u8] {
    m.payload().expect("message has a value")
}

pub fn redis(settings: &Settings) -> redis::Client {
    redis::Client::open(settings.redis.url.as_str()).expect("redis url")
}

/// HTTP client for the schema registry.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The project's Python (setup.sh's venv), with Confluent's client and onnxruntime.
/// Missing Python fails the test: interop is part of the suite, not optional.
pub fn python() -> PathBuf {
    let path = std::env::var_os("LANES_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "{} not found: run scripts/setup.sh",
        path.display()
    );
    path
}

/// An address on loopback where nothing listens.
pub fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr.to_string()
}
