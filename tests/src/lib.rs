//! Test harness for Lanes' end-to-end tests: everything a test needs to talk to the real
//! local stack (`scripts/dev-up.sh`) in one place. Each test uses its own random topic
//! and group names, so tests run in parallel against one broker.

pub mod fleet;
pub mod ledger;
pub mod prom;
pub mod proxy;
pub mod rights;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use lanes_common::Settings;
use lanes_common::kafka::LoggingContext;
use lanes_common::producer::Producer;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureRecord;

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

pub fn producer(settings: &Settings) -> Producer {
    lanes_common::kafka::producer(&settings.kafka, "lanes-test").expect("producer")
}

/// A publisher as a client of Lanes would write: rdkafka's own future producer,
/// idempotent, with the lane's broker settings.
pub fn client_producer(settings: &Settings) -> rdkafka::producer::FutureProducer {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", &settings.kafka.bootstrap_servers)
        .set("client.id", "lanes-test-client")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5");
    c.create().expect("client producer")
}

/// Produces one record and waits for its acknowledgement.
pub async fn produce(producer: &Producer, topic: &str, key: &[u8], value: &[u8]) {
    produce_record(producer, FutureRecord::to(topic).key(key).payload(value)).await;
}

/// Sends `record` and waits for the broker's acknowledgement, failing the test after 30 s.
pub async fn produce_record<K, P>(producer: &Producer, record: FutureRecord<'_, K, P>)
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    tokio::time::timeout(Duration::from_secs(30), producer.send(record))
        .await
        .expect("acknowledged within 30 s")
        .expect("record acknowledged");
}

/// The consumer tests use: the services' own factory, in a fresh group.
pub type TestConsumer = StreamConsumer<LoggingContext>;

/// A consumer in a fresh group, subscribed to `topics`, reading from the start.
pub fn consumer(settings: &Settings, topics: &[&str]) -> TestConsumer {
    let c = metadata_probe(settings);
    c.subscribe(topics).expect("subscribe");
    c
}

/// A consumer in no group, for reading metadata. A member dropped while its group is
/// still assigning can hang in librdkafka's close: the revoke callback's incremental
/// unassign was seen waiting forever on the main thread.
pub fn metadata_probe(settings: &Settings) -> TestConsumer {
    lanes_common::kafka::consumer(
        &settings.kafka,
        "lanes-test",
        &unique("group"),
        LoggingContext::default(),
    )
    .expect("consumer")
}

/// `headers` with one more header named by raw bytes, which need not be UTF-8 (as any
/// Kafka client may write; rdkafka's own API takes names as `str`).
#[allow(unsafe_code)]
pub fn with_raw_header(
    headers: rdkafka::message::OwnedHeaders,
    name: &[u8],
    value: &[u8],
) -> rdkafka::message::OwnedHeaders {
    use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_headers_t};
    use rdkafka::message::BorrowedHeaders;
    // SAFETY: an `OwnedHeaders`' borrowed view is its librdkafka headers object, which
    // copies the name and value it is given.
    unsafe {
        let raw = headers.as_borrowed() as *const BorrowedHeaders as *mut rd_kafka_headers_t;
        rd_kafka_header_add(
            raw,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        );
    }
    headers
}

/// A source as the services start one, with the settings' runner, keeping headers and
/// without metrics; `hold` is its drain timeout.
pub fn source(
    settings: &Settings,
    service: &str,
    group: &str,
    topics: &[&str],
    hold: Duration,
) -> lanes_common::source::Source {
    lanes_common::source::Source::start(
        &settings.kafka,
        service,
        group,
        topics,
        hold,
        &settings.runner,
        lanes_common::source::RecordHeaders::Keep,
        None,
    )
    .expect("source starts")
}

/// The next record `source` hands on, answering revocations and passing over
/// assignments; fails the test after `timeout`.
pub async fn next_message(
    source: &mut lanes_common::source::Source,
    timeout: Duration,
) -> OwnedMessage {
    use lanes_common::source::SourceEvent;
    tokio::time::timeout(timeout, async {
        loop {
            match source.recv().await.expect("source runs") {
                SourceEvent::Message(m) => return m,
                SourceEvent::Revoked { done, .. } => {
                    let _ = done.send(());
                }
                SourceEvent::Assigned(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no record within {timeout:?}"))
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

/// The ids of this process's threads named `name`.
pub fn threads(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let tid = t.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            (comm.trim() == name).then_some(tid)
        })
        .collect()
}

/// A thread's time on a CPU and its voluntary context switches (each one a wake-up).
pub fn cpu_and_wakeups(tid: &str) -> (Duration, u64) {
    let sched = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    let ns: u64 = sched.split_whitespace().next().unwrap().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let switches = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (Duration::from_nanos(ns), switches)
}

/// Watches the thread `tid` for 3 s and fails the test unless it slept through them:
/// under 5 ms on a CPU and at most 12 wake-ups.
pub async fn assert_sleeps(tid: &str) {
    let (cpu0, woke0) = cpu_and_wakeups(tid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu1, woke1) = cpu_and_wakeups(tid);
    let (cpu, woke) = (cpu1 - cpu0, woke1 - woke0);
    eprintln!("idle 3 s: {woke} wake-ups, {cpu:?} on a CPU");
    assert!(
        woke <= 12,
        "an idle polling thread woke {woke} times in 3 s"
    );
    assert!(
        cpu < Duration::from_millis(5),
        "an idle polling thread ran {cpu:?} in 3 s"
    );
}

/// The payload of a message, which must have one.
pub fn payload(m: &OwnedMessage) -> &[u8] {
    m.payload().expect("message has a value")
}

pub fn redis(settings: &Settings) -> redis::Client {
    lanes_common::cache::client(&settings.redis).expect("redis client")
}

/// The streaming lane's services, upstream first.
pub fn streaming_services() -> Vec<lanes_common::service::ServiceDef> {
    lanes_services::streaming()
}

/// Every service `lanes up` runs: the streaming lane and the fallback-responder.
pub fn all_services() -> Vec<lanes_common::service::ServiceDef> {
    lanes_services::all()
}

/// Every cache key of these settings' prefix, by SCAN: KEYS would block a shared Redis
/// for as long as its whole keyspace takes to walk.
pub async fn cache_keys(settings: &Settings) -> std::collections::HashSet<String> {
    let mut redis = redis(settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // SCAN may return a key twice; the set keeps it once.
    let mut seen = std::collections::HashSet::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys) =
            lanes_common::cache::scan(&mut redis, &settings.cache_writer.key_prefix, cursor, 1000)
                .await
                .unwrap();
        seen.extend(keys);
        if next == 0 {
            return seen;
        }
        cursor = next;
    }
}

/// Deletes every cache key of these settings' prefix.
pub async fn delete_cache(settings: &Settings) {
    let keys: Vec<String> = cache_keys(settings).await.into_iter().collect();
    let mut redis = redis(settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for chunk in keys.chunks(500) {
        let _: () = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

/// A STREAM prediction for `entity` scored now by model version 1.
pub fn prediction_now(entity: &str, score: f64) -> lanes_common::records::Prediction {
    let now = lanes_common::records::now_millis();
    lanes_common::records::Prediction {
        event_id: unique("e"),
        entity_id: entity.into(),
        score,
        label: None,
        model_name: "fraud".into(),
        model_version: "1".into(),
        lane: lanes_common::records::Lane::Stream,
        event_time: now,
        ingested_at: Some(now),
        scored_at: now,
        batch_id: None,
    }
}

/// Registers `schema` (Avro JSON text) under `subject` in the settings' registry and
/// returns the registry's answer (`{"id": ...}`).
pub async fn register_schema(
    settings: &Settings,
    subject: &str,
    schema: &str,
) -> serde_json::Value {
    let url = format!("{}/subjects/{subject}/versions", settings.registry.url);
    let r = http()
        .post(url)
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(serde_json::json!({ "schema": schema }).to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{subject}: {}", r.status());
    r.json().await.unwrap()
}

/// Registers a plain `"string"` schema under `subject`, so no Lanes record can be
/// registered there: every write to that subject's topic is refused.
pub async fn occupy_subject(settings: &Settings, subject: &str) {
    register_schema(settings, subject, r#""string""#).await;
}

/// Deletes the cache entries of `entities`.
pub async fn delete_entries<'a>(
    settings: &Settings,
    entities: impl IntoIterator<Item = &'a String>,
) {
    let keys: Vec<String> = entities
        .into_iter()
        .map(|e| lanes_common::cache::key(&settings.cache_writer.key_prefix, e))
        .collect();
    let mut r = redis(settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("UNLINK")
        .arg(keys)
        .query_async(&mut r)
        .await
        .unwrap();
}

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

/// One isolated Lanes deployment on the shared local stack: its own topics, groups,
/// cache prefix and admin ports, so tests run side by side.
#[derive(Clone)]
pub struct Lane {
    pub settings: Settings,
    pub id: String,
}

impl Lane {
    pub fn new(what: &str) -> Self {
        let id = unique(what);
        let mut s = settings();
        lanes_services::namespace(&mut s, &id);
        s.model.dir = root().join("models/fraud/1");
        s.admin.ports.up = free_port();
        s.admin.ports.ingest = free_port();
        s.admin.ports.micro_batcher = free_port();
        s.admin.ports.scorer = free_port();
        s.admin.ports.cache_writer = free_port();
        s.admin.ports.fallback_responder = free_port();
        s.admin.ports.batch = free_port();
        Self { settings: s, id }
    }

    /// Every prediction on `topic` until each of `ids` has one (three minutes at most),
    /// with its partition and offset, in the order read.
    pub async fn predictions_until(
        &self,
        topic: &str,
        ids: &std::collections::HashSet<String>,
    ) -> Vec<(i32, i64, lanes_common::records::Prediction)> {
        let reader = consumer(&self.settings, &[topic]);
        let codec = lanes_common::avro::AvroCodec::new(&self.settings.registry).unwrap();
        let mut seen = std::collections::HashSet::new();
        let mut all = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while !ids.iter().all(|id| seen.contains(id)) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = tokio::time::timeout(left, reader.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{} of {} predictions on {topic} in time; missing {:?}",
                        seen.len(),
                        ids.len(),
                        ids.difference(&seen).take(5).collect::<Vec<_>>()
                    )
                })
                .unwrap();
            let p = codec
                .decode::<lanes_common::records::Prediction>(m.payload().unwrap_or_default())
                .await
                .unwrap()
                .record;
            seen.insert(p.event_id.clone());
            all.push((m.partition(), m.offset(), p));
        }
        all
    }

    /// Writes the full settings to a config file for service processes (`LANES_CONFIG`),
    /// so a spawned binary runs with exactly what an in-process service would.
    pub fn config_file(&self) -> PathBuf {
        let dir = std::env::temp_dir().join("lanes-tests");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!(
            "{}-{}.toml",
            self.id,
            uuid::Uuid::new_v4().simple()
        ));
        let text = toml::to_string(&self.settings).expect("settings serialize as TOML");
        std::fs::write(&path, text).expect("config file written");
        path
    }

    /// The environment of a service process: its config file, and quiet logs
    /// (`LANES_TEST_LOG` sets their level).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                lanes_common::config::CONFIG_FILE_ENV.to_string(),
                self.config_file().display().to_string(),
            ),
            (
                "RUST_LOG".to_string(),
                std::env::var("LANES_TEST_LOG").unwrap_or_else(|_| "warn".to_string()),
            ),
        ]
    }

    /// Creates every topic of this lane.
    pub async fn create_topics(&self) {
        create_topics(&self.settings, &self.settings.topics.all()).await;
    }

    /// Starts services in this process; they stop when the returned handle is stopped.
    pub fn start(&self, defs: &[lanes_common::service::ServiceDef]) -> Running {
        let token = tokio_util::sync::CancellationToken::new();
        let metrics = prometheus::Registry::new();
        let consumer = lanes_common::service::consumer_metrics(&metrics).expect("consumer metrics");
        let mut handles = Vec::new();
        let flags = lanes_common::service::host(
            &self.settings,
            defs,
            &metrics,
            &consumer,
            &token,
            |name, fut| handles.push((name, tokio::spawn(fut))),
        );
        let tasks = handles
            .into_iter()
            .zip(flags)
            .map(|((name, task), ready)| (name, ready, task))
            .collect();
        Running {
            token,
            tasks,
            metrics,
        }
    }

    /// Starts a service binary (`lanes-scorer`, `lanes`, ...) with this lane's settings;
    /// killed when the handle drops, so a failed test leaves nothing running.
    pub fn spawn(&self, binary: &str, args: &[&str]) -> Proc {
        Proc(
            std::process::Command::new(bin(binary))
                .args(args)
                .envs(self.env())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("{binary} starts: {e}")),
        )
    }

    /// Runs the `lanes` CLI with this lane's settings to completion.
    pub fn lanes(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(bin("lanes"))
            .args(args)
            .envs(self.env())
            .output()
            .expect("lanes runs")
    }

    /// Publishes raw lines to the raw topic, keyed by entity when they name one.
    pub async fn publish_raw(&self, producer: &Producer, lines: &[String]) {
        for line in lines {
            let key = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| {
                    v.get("entity_id")
                        .and_then(|e| e.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            produce(
                producer,
                &self.settings.topics.raw,
                key.as_bytes(),
                line.as_bytes(),
            )
            .await;
        }
    }
}

/// Services running in this process.
pub struct Running {
    pub token: tokio_util::sync::CancellationToken,
    pub tasks: Vec<(
        &'static str,
        lanes_common::admin::ReadyFlag,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    pub metrics: prometheus::Registry,
}

impl Running {
    /// Waits until every service says it is ready. Generous: a service loading a slow
    /// model shares the two cores with the other tests of its binary.
    pub async fn ready(&self) {
        wait_for("services ready", Duration::from_secs(120), || async {
            self.tasks.iter().all(|(_, r, _)| r.is_set()).then_some(())
        })
        .await;
    }

    /// Stops the services gracefully and checks each returned `Ok`.
    pub async fn stop(mut self) {
        self.token.cancel();
        for (name, _, task) in std::mem::take(&mut self.tasks) {
            match tokio::time::timeout(Duration::from_secs(30), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("{name} failed: {e:#}"),
                Ok(Err(e)) => panic!("{name} panicked: {e}"),
                Err(_) => panic!("{name} did not stop within 30s"),
            }
        }
    }

    /// Waits until the metric (see [`Running::metric`]) reaches `at_least`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) {
        wait_for(name, Duration::from_secs(30), || async {
            (self.metric(name, labels) >= at_least).then_some(())
        })
        .await;
    }

    /// The value of a counter or gauge sample, summed over labels matching `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics, name, labels)
    }
}

impl Drop for Running {
    /// A test that failed before `stop` still stops its services, so they do not run on
    /// into the runtime's shutdown.
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Sums the samples of `name` whose labels include `labels` (histograms: their counts;
/// `<histogram>_sum`, as Prometheus exposes it: their sums).
pub fn metric_value(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus::proto::MetricType;
    let families = registry.gather();
    let histogram_sum = name.strip_suffix("_sum").filter(|base| {
        families
            .iter()
            .any(|f| f.name() == *base && f.get_field_type() == MetricType::HISTOGRAM)
    });
    let name = histogram_sum.unwrap_or(name);
    let mut total = 0.0;
    for family in families.iter().filter(|f| f.name() == name) {
        for m in family.get_metric() {
            let matches = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if matches {
                total += match family.get_field_type() {
                    MetricType::COUNTER => m.get_counter().get_value(),
                    MetricType::GAUGE => m.get_gauge().get_value(),
                    MetricType::HISTOGRAM if histogram_sum.is_some() => {
                        m.get_histogram().get_sample_sum()
                    }
                    MetricType::HISTOGRAM => m.get_histogram().get_sample_count() as f64,
                    _ => 0.0,
                };
            }
        }
    }
    total
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A workspace binary, built beside the test executable.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_path(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Where a workspace binary is built, whether or not it exists.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .join(name)
}

/// Sends SIGKILL (crash) or SIGTERM (graceful stop) to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    lanes_common::process::signal(child.id(), sig).unwrap_or_else(|e| panic!("{e}"));
}

/// A Redis of the test's own on `port`, so it can be taken away and brought back;
/// stopped when dropped.
pub fn redis_server(port: u16) -> RedisGuard {
    start_redis(port, &["--appendonly", "no"])
}

/// [`redis_server`] keeping an append-only file in `dir`, so a restart brings its data
/// back.
pub fn redis_server_in(port: u16, dir: &std::path::Path) -> RedisGuard {
    let dir = dir.display().to_string();
    start_redis(
        port,
        &[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            &dir,
        ],
    )
}

fn start_redis(port: u16, persistence: &[&str]) -> RedisGuard {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(persistence)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs (scripts/setup.sh installs it)");
    let mut redis = RedisGuard(child);
    wait_for_port(&mut redis.0, port, Duration::from_secs(10), "redis-server");
    redis
}

/// A tansu broker of the test's own on `port`, keeping its topics, records and
/// committed offsets in SQLite files under `dir` (tansu's `libsql` feature, which
/// `scripts/setup.sh` builds), so a restart brings them back. Waits until it accepts
/// connections; killed when dropped.
pub fn tansu_broker_in(port: u16, dir: &std::path::Path) -> Proc {
    let url = format!("tcp://127.0.0.1:{port}");
    let child = std::process::Command::new("tansu")
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        // tansu reads a sqlite:// path relative to its working directory.
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tansu runs (scripts/setup.sh installs it)");
    let mut broker = Proc(child);
    wait_for_port(
        &mut broker,
        port,
        Duration::from_secs(30),
        "tansu on SQLite (built with --features libsql?)",
    );
    broker
}

/// Waits until `child`, a server just started, accepts connections on `port`; panics
/// if it exits first or takes longer than `timeout`.
fn wait_for_port(child: &mut std::process::Child, port: u16, timeout: Duration, what: &str) {
    let deadline = std::time::Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}");
        }
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a GET of `url` answers with a success status.
pub async fn answers_ok(url: &str) -> bool {
    http()
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

pub struct RedisGuard(pub std::process::Child);

impl Drop for RedisGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process that is killed if still running when dropped.
pub struct Proc(pub std::process::Child);

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
