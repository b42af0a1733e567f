//! `lanes bench`: the streaming lane's sustained throughput and event-to-prediction
//! latency (and event-to-cache, read back from Redis) under several window settings
//! across a sweep of offered rates, beside the raw broker's produce and consume rates
//! measured in the same run. Each setting gets fresh topics and groups; the four
//! services run in this process as in `lanes up`.
//! It scores with the user's model (`--model`) on their sample events (`--events`),
//! draws p99 latency and batch size against the rate (SVG), and recommends the window
//! that batches most while its p99 stays within the latency target at every rate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lanes_common::Settings;
use lanes_common::admin::ReadyFlag;
use lanes_common::avro::AvroCodec;
use lanes_common::generator::{Generator, Sample};
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::model::ModelSpec;
use lanes_common::records::{Event, MicroBatch, Prediction, now_millis};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events per throughput run (one burst, all published at once).
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
    /// Offered rates (events/s) of the latency runs.
    #[arg(long, alias = "rate", value_delimiter = ',', default_value = "200,1000,5000",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    rates: Vec<usize>,
    /// The model to score with: a model folder (one subfolder per version, the latest
    /// is used) or one version's folder [default: model.dir].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sample raw events, JSON lines as publishers write them, cycled to drive the
    /// lane; each copy gets its own event_id, and its send time as its event time
    /// [default: generated card transactions].
    #[arg(long)]
    events: Option<PathBuf>,
    /// The p99 event-to-prediction latency (ms) the recommended window must hold at
    /// every rate [default: micro_batcher.target_latency_ms, else 100].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    target_ms: Option<u64>,
    /// Where to draw the latency and batch-size curves (SVG).
    #[arg(long, default_value = "bench-stream.svg")]
    plot: PathBuf,
    /// Length of each latency run, in seconds.
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    seconds: u64,
    /// Messages for the raw broker rates.
    #[arg(long, default_value_t = 100_000)]
    raw_messages: usize,
    /// Messages for the raw broker's one-hop latency (paced at 200/s).
    #[arg(long, default_value_t = 1000)]
    hop_messages: usize,
    /// Window delays to compare (ms).
    #[arg(long, value_delimiter = ',', default_value = "5,20,100")]
    delays: Vec<u64>,
    /// Window sizes to compare (events).
    #[arg(long, value_delimiter = ',', default_value = "64,512",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    sizes: Vec<usize>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-stream.json")]
    out: PathBuf,
    /// Also run each setting at half the rate it drained its burst at, and print its
    /// p99 beside the latency goal there (the window's delay + 25 ms).
    #[arg(long)]
    half_peak: bool,
}

/// Goal: p99 at half the peak rate within the window's delay plus this (ms).
const GOAL_OVER_WINDOW_MS: f64 = 25.0;

/// Settings with topics, groups and cache keys of their own: two benchmarks started in
/// the same millisecond (in parallel tests) must not share them.
pub(crate) fn unique(settings: &Settings, tag: &str) -> Settings {
    let mut s = settings.clone();
    let id = format!("bench-{tag}-{}-{}", std::process::id(), now_millis());
    lanes_services::namespace(&mut s, &id);
    s
}

pub(crate) fn reader(s: &Settings, topic: &str) -> anyhow::Result<StreamConsumer> {
    let c: StreamConsumer = lanes_common::kafka::quiet_consumer_config(
        &s.kafka,
        "lanes-bench",
        &format!("{topic}-reader"),
    )
    .create()?;
    c.subscribe(&[topic])?;
    Ok(c)
}

/// Deletes the cache entries a run wrote (its own key prefix), so repeated runs do not
/// fill the shared Redis.
pub(crate) async fn forget_keys(s: &Settings) -> anyhow::Result<()> {
    let (mut c, keys) = cache_keys(s).await?;
    unlink(&mut c, &keys).await
}

/// [`forget_keys`], reading first what the entries cost Redis ([`footprint`]) from the
/// same listing of keys.
pub(crate) async fn footprint_then_forget_keys(s: &Settings) -> anyhow::Result<serde_json::Value> {
    let (mut c, keys) = cache_keys(s).await?;
    let footprint = footprint(&mut c, &keys).await;
    unlink(&mut c, &keys).await?;
    footprint
}

async fn unlink(c: &mut redis::aio::MultiplexedConnection, keys: &[String]) -> anyhow::Result<()> {
    for chunk in keys.chunks(1000) {
        let _: i64 = redis::cmd("UNLINK").arg(chunk).query_async(c).await?;
    }
    Ok(())
}

/// What `keys` cost Redis: how many, their mean `MEMORY USAGE` in bytes, and how many
/// hashes Redis holds in each encoding. An entry whose values all fit
/// `hash-max-listpack-value` is a listpack, about half a hashtable's size.
async fn footprint(
    c: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> anyhow::Result<serde_json::Value> {
    let (mut entries, mut bytes) = (0u64, 0u64);
    let mut encodings = std::collections::BTreeMap::<String, u64>::new();
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
            pipe.cmd("OBJECT").arg("ENCODING").arg(k);
        }
        let replies: Vec<redis::Value> = pipe.query_async(c).await?;
        for pair in replies.chunks(2) {
            let size: Option<u64> = redis::from_redis_value_ref(&pair[0])?;
            let encoding: Option<String> = redis::from_redis_value_ref(&pair[1])?;
            // A key deleted since the scan answers nil to both.
            if let (Some(size), Some(encoding)) = (size, encoding) {
                entries += 1;
                bytes += size;
                *encodings.entry(encoding).or_default() += 1;
            }
        }
    }
    Ok(json!({
        "entries": entries,
        "mean_entry_bytes": if entries == 0 { f64::NAN } else { bytes as f64 / entries as f64 },
        "encodings": encodings,
    }))
}

/// Every key of the lane's cache, and the connection that listed them.
async fn cache_keys(
    s: &Settings,
) -> anyhow::Result<(redis::aio::MultiplexedConnection, Vec<String>)> {
    let client = lanes_common::cache::client(&s.redis)?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let (mut all, mut cursor) = (Vec::new(), 0u64);
    loop {
        let (next, keys) =
            lanes_common::cache::scan(&mut c, &s.cache_writer.key_prefix, cursor, 1000).await?;
        all.extend(keys);
        if next == 0 {
            return Ok((c, all));
        }
        cursor = next;
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Raw produce and consume rates of 200-byte messages, one client each.
async fn raw_rates(s: &Settings, n: usize) -> anyhow::Result<(f64, f64)> {
    let s = unique(s, "raw");
    let topic = s.topics.raw.clone();
    lanes_common::kafka::ensure_topics(&s.kafka, &[&topic]).await?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    let payload = vec![b'x'; 200];
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let key = (i % 64).to_string();
        pending.push(
            enqueue(
                &producer,
                FutureRecord::to(&topic).key(&key).payload(&payload),
            )
            .await?,
        );
    }
    for d in pending {
        delivered(d).await?;
    }
    let produce = n as f64 / started.elapsed().as_secs_f64();
    let consumer = reader(&s, &topic)?;
    let mut first: Option<Instant> = None;
    for _ in 0..n {
        consumer.recv().await?;
        first.get_or_insert_with(Instant::now);
    }
    let consume = n as f64 / first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
    Ok((produce, consume))
}

const WARM_UP: &str = "warm-up";

/// One-hop produce -> consume latency (ms, sorted) of `n` messages paced at 200/s.
async fn one_hop(s: &Settings, n: usize) -> anyhow::Result<Vec<f64>> {
    let s = unique(s, "hop");
    let topic = s.topics.raw.clone();
    lanes_common::kafka::ensure_topics(&s.kafka, &[&topic]).await?;
    let consumer = reader(&s, &topic)?;
    let producer = lanes_common::kafka::producer(&s.kafka, "lanes-bench")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A new client's first records wait for the producer's connection, metadata and id
    // and the consumer's first fetches (about 100 ms here): that start is not the hop
    // being measured, so one record goes through before the clock starts.
    delivered(
        enqueue(
            &producer,
            FutureRecord::<str, str>::to(&topic).payload(WARM_UP),
        )
        .await?,
    )
    .await?;
    let warm = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .context("one-hop warm-up record lost")??;
    anyhow::ensure!(
        warm.payload() == Some(WARM_UP.as_bytes()),
        "one-hop topic not empty"
    );
    let origin = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            tokio::time::sleep_until((origin + Duration::from_millis(5 * i as u64)).into()).await;
            let sent = origin.elapsed().as_micros().to_string();
            let d = enqueue(
                &producer,
                FutureRecord::<str, str>::to(&topic).payload(&sent),
            )
            .await?;
            drop(d);
        }
        anyhow::Ok(producer)
    });
    let mut lat = Vec::with_capacity(n);
    while lat.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("one-hop message lost")??;
        let sent: u128 = std::str::from_utf8(m.payload().unwrap_or_default())?.parse()?;
        lat.push((origin.elapsed().as_micros() - sent) as f64 / 1000.0);
    }
    drop(sender.await??);
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

pub(crate) struct Lane {
    pub(crate) settings: Settings,
    /// Publishes the runs' events: one producer for the lane, so that only its first run
    /// (the burst) pays for a new producer's start.
    producer: lanes_common::producer::Producer,
    /// Events published through the lane so far: each has one prediction to cache.
    published: AtomicU64,
    pub(crate) metrics: prometheus::Registry,
    token: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Lane {
    pub(crate) async fn start(
        s: Settings,
        services: &[lanes_common::service::ServiceDef],
    ) -> anyhow::Result<Self> {
        lanes_common::kafka::ensure_topics(&s.kafka, &s.topics.all()).await?;
        let token = CancellationToken::new();
        let registry = prometheus::Registry::new();
        let mut tasks = Vec::new();
        let consumer = lanes_common::service::consumer_metrics(&registry)?;
        let flags =
            lanes_common::service::host(&s, services, &registry, &consumer, &token, |_, fut| {
                tasks.push(tokio::spawn(fut))
            });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !flags.iter().all(ReadyFlag::is_set) {
            anyhow::ensure!(Instant::now() < deadline, "services not ready within 60s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            producer: lanes_common::kafka::producer(&s.kafka, "lanes-bench")?,
            published: AtomicU64::new(0),
            settings: s,
            metrics: registry,
            token,
            tasks,
        })
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

/// What a run measured: seconds from first publish to last prediction, latencies in ms
/// from each event's publish to its prediction's arrival, and each event's publish and
/// arrival on the wall clock (ms), which the records' own timestamps are compared with.
struct Drive {
    secs: f64,
    latencies: Vec<f64>,
    sent_at: HashMap<String, i64>,
    arrived_at: HashMap<String, i64>,
}

/// Publishes `lines` (all at once, or paced at `rate` per second) and returns when every
/// event has a prediction.
async fn drive(
    lane: &Lane,
    lines: Vec<(String, String)>,
    rate: Option<usize>,
) -> anyhow::Result<Drive> {
    let s = &lane.settings;
    let consumer = reader(s, &s.topics.predictions)?;
    let codec = AvroCodec::new(&s.registry)?;
    let producer = lane.producer.clone();
    // Join the group before publishing, so the first predictions are not missed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let total = lines.len();
    lane.published.fetch_add(total as u64, Ordering::Relaxed);
    let expected: std::collections::HashSet<String> =
        lines.iter().map(|(id, _)| id.clone()).collect();
    let started = Instant::now();
    let topic = s.topics.raw.clone();
    let sender = tokio::spawn(async move {
        let mut sent: HashMap<String, (Instant, i64)> = HashMap::with_capacity(total);
        let mut pending = Vec::with_capacity(total);
        for (i, (id, line)) in lines.into_iter().enumerate() {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            sent.insert(id, (Instant::now(), now_millis()));
            pending.push(
                enqueue(
                    &producer,
                    FutureRecord::<str, str>::to(&topic).payload(&line),
                )
                .await?,
            );
        }
        for d in pending {
            delivered(d).await?;
        }
        anyhow::Ok(sent)
    });
    let mut arrived: HashMap<String, (Instant, i64)> = HashMap::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(300);
    while arrived.len() < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {total} predictions after 300s",
            arrived.len()
        );
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("no prediction for 30s")??;
        let p = codec
            .decode::<Prediction>(m.payload().unwrap_or_default())
            .await?
            .record;
        if expected.contains(&p.event_id) {
            arrived
                .entry(p.event_id)
                .or_insert_with(|| (Instant::now(), now_millis()));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = sender.await??;
    let mut latencies: Vec<f64> = arrived
        .iter()
        .filter_map(|(id, (at, _))| {
            sent.get(id)
                .map(|(s, _)| at.duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(Drive {
        secs: elapsed,
        latencies,
        sent_at: sent.into_iter().map(|(id, (_, ms))| (id, ms)).collect(),
        arrived_at: arrived.into_iter().map(|(id, (_, ms))| (id, ms)).collect(),
    })
}

/// The stages an event's latency splits into, by when each service produced its
/// record (the records' create times): publish to ingest's event, to the batch that
/// held it, to its prediction, and from there to the reader.
pub(crate) const STAGES: [&str; 4] = ["ingest", "micro-batcher", "scorer", "delivery"];

/// One paced run of `seconds` at `rate` events/s through `lane`.
async fn paced(
    lane: &Lane,
    source: &Source,
    seed: u64,
    rate: usize,
    seconds: u64,
) -> anyhow::Result<Point> {
    let before = batches(&lane.metrics);
    let lines = source.lines(seed, rate * seconds as usize);
    let marks = Marks::take(&lane.settings)?;
    let run = drive(lane, lines, Some(rate)).await?;
    let after = batches(&lane.metrics);
    let by_stage = marks.stages(&lane.settings, &run).await?;
    // Every prediction so far, an earlier run's stragglers included, is in Redis.
    let want = lane.published.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache_writes(&lane.metrics) < want {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cache-writer applied {} of {want} predictions 30 s after the run",
            cache_writes(&lane.metrics)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let to_cache = cached_latencies(&lane.settings, &run.sent_at).await?;
    let (p50_ms, p99_ms) = p50_p99(&run.latencies);
    Ok(Point {
        rate,
        p50_ms,
        p99_ms,
        mean_batch: round1((after.1 - before.1) / after.0.saturating_sub(before.0).max(1) as f64),
        stages: by_stage.map(|l| p50_p99(&l)),
        to_cache: (!to_cache.is_empty()).then(|| {
            let (p50_ms, p99_ms) = p50_p99(&to_cache);
            ToCache {
                p50_ms,
                p99_ms,
                entities: to_cache.len(),
            }
        }),
    })
}

/// p50 and p99 of sorted latencies, to a tenth of a millisecond.
fn p50_p99(sorted: &[f64]) -> (f64, f64) {
    (
        round1(percentile(sorted, 0.5)),
        round1(percentile(sorted, 0.99)),
    )
}

/// Predictions the cache-writer has applied to Redis, whatever the result.
fn cache_writes(registry: &prometheus::Registry) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "lanes_cache_writer_writes_total")
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// Event-to-cache latencies (ms, sorted) from the cache itself: for each entity whose
/// entry holds one of `sent`'s events, Redis's `written_at` minus that event's publish
/// time (one host, one clock). The cache keeps an entity's last write only, so this is
/// the run's last event per entity.
async fn cached_latencies(s: &Settings, sent: &HashMap<String, i64>) -> anyhow::Result<Vec<f64>> {
    let (mut c, keys) = cache_keys(s).await?;
    let mut out = Vec::new();
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("HMGET").arg(k).arg("event_id").arg("written_at");
        }
        let entries: Vec<(Option<String>, Option<i64>)> = pipe.query_async(&mut c).await?;
        for (id, written) in entries {
            if let (Some(&t0), Some(at)) = (id.and_then(|id| sent.get(&id)), written) {
                out.push((at - t0) as f64);
            }
        }
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Each stage's latencies (ms, sorted) over the events seen at every step.
pub(crate) fn stages(
    sent: &HashMap<String, i64>,
    events: &HashMap<String, i64>,
    batches: &HashMap<String, i64>,
    predictions: &HashMap<String, i64>,
    arrived: &HashMap<String, i64>,
) -> [Vec<f64>; 4] {
    let mut out: [Vec<f64>; 4] = Default::default();
    for (id, &t0) in sent {
        let (Some(&e), Some(&b), Some(&p), Some(&a)) = (
            events.get(id),
            batches.get(id),
            predictions.get(id),
            arrived.get(id),
        ) else {
            continue;
        };
        for (stage, (from, to)) in out.iter_mut().zip([(t0, e), (e, b), (b, p), (p, a)]) {
            stage.push((to - from) as f64);
        }
    }
    for stage in &mut out {
        stage.sort_by(f64::total_cmp);
    }
    out
}

/// Create times (ms) of the records on `topic` from `from`, by the event ids each holds,
/// until every id in `want` is seen.
async fn created<R: lanes_common::records::Record>(
    s: &Settings,
    codec: &AvroCodec,
    topic: &str,
    from: &rdkafka::TopicPartitionList,
    want: &std::collections::HashSet<&String>,
    ids: impl Fn(R) -> Vec<String>,
) -> anyhow::Result<HashMap<String, i64>> {
    let c: StreamConsumer =
        lanes_common::kafka::quiet_consumer_config(&s.kafka, "lanes-bench", "bench-stages")
            .create()?;
    c.assign(from)?;
    let mut out = HashMap::with_capacity(want.len());
    while out.len() < want.len() {
        let m = tokio::time::timeout(Duration::from_secs(10), c.recv())
            .await
            .with_context(|| format!("{topic}: {} of {} events", out.len(), want.len()))??;
        let Some(at) = m.timestamp().to_millis() else {
            continue;
        };
        let record = codec.decode::<R>(m.payload().unwrap_or_default()).await?;
        for id in ids(record.record) {
            if want.contains(&id) {
                out.entry(id).or_insert(at);
            }
        }
    }
    Ok(out)
}

/// Where to start reading each topic a run writes, taken before the run.
struct Marks {
    events: rdkafka::TopicPartitionList,
    batches: rdkafka::TopicPartitionList,
    predictions: rdkafka::TopicPartitionList,
}

impl Marks {
    fn take(s: &Settings) -> anyhow::Result<Self> {
        use lanes_common::kafka::end_offsets;
        let c: rdkafka::consumer::BaseConsumer =
            lanes_common::kafka::quiet_consumer_config(&s.kafka, "lanes-bench", "bench-ends")
                .create()?;
        Ok(Self {
            events: end_offsets(&c, &s.topics.events)?,
            batches: end_offsets(&c, &s.topics.batches)?,
            predictions: end_offsets(&c, &s.topics.predictions)?,
        })
    }

    /// A run's latency by stage, from the records it left on the topics.
    async fn stages(&self, s: &Settings, run: &Drive) -> anyhow::Result<[Vec<f64>; 4]> {
        let codec = AvroCodec::new(&s.registry)?;
        let want: std::collections::HashSet<&String> = run.sent_at.keys().collect();
        let events = created(
            s,
            &codec,
            &s.topics.events,
            &self.events,
            &want,
            |e: Event| vec![e.event_id],
        );
        let batches = created(
            s,
            &codec,
            &s.topics.batches,
            &self.batches,
            &want,
            |b: MicroBatch| b.event_ids,
        );
        let predictions = created(
            s,
            &codec,
            &s.topics.predictions,
            &self.predictions,
            &want,
            |p: Prediction| vec![p.event_id],
        );
        let (events, batches, predictions) = tokio::try_join!(events, batches, predictions)?;
        Ok(stages(
            &run.sent_at,
            &events,
            &batches,
            &predictions,
            &run.arrived_at,
        ))
    }
}

/// Entities (cards) generated events are spread over, evenly.
pub(crate) const ENTITIES: usize = 10_000;

/// `n` generated events over `entities` cards as (event id, raw JSON line), written by
/// `json`.
pub(crate) fn events(
    seed: u64,
    n: usize,
    entities: usize,
    json: fn(&Sample) -> String,
) -> Vec<(String, String)> {
    Generator::new(seed, entities)
        .take(n)
        .map(|s| (s.event_id.clone(), json(&s)))
        .collect()
}

/// Where a run's events come from.
pub(crate) enum Source {
    /// The generator's card transactions.
    Generated,
    /// A user's sample events, cycled.
    Sample(Vec<serde_json::Map<String, serde_json::Value>>),
}

impl Source {
    /// Reads a JSON-lines sample, refusing (by line number) any event ingest would
    /// dead-letter under `settings` and the model's features: a refused event would
    /// never be scored, and the bench would wait for it.
    pub(crate) fn sample(path: &Path, settings: &Settings) -> anyhow::Result<Self> {
        use lanes_ingest::validate::{Origin, Rules, validate};
        let spec = ModelSpec::read(&settings.model.resolve()?)?;
        let rules = Rules::new(spec.features, &settings.ingest);
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut events = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{} line {}", path.display(), i + 1);
            let serde_json::Value::Object(mut event) =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?
            else {
                anyhow::bail!("{}: an event is a JSON object", at());
            };
            // Each copy gets its own id and its send time (see `lines`).
            event.remove("event_id");
            event.remove("event_time");
            let raw = serde_json::to_vec(&event)?;
            let origin = Origin {
                topic: &settings.topics.raw,
                partition: 0,
                offset: 0,
                timestamp: None,
            };
            validate(&raw, &rules, &origin, now_millis()).map_err(|(class, why)| {
                anyhow::anyhow!("{}: ingest refuses it: {class}: {why}", at())
            })?;
            events.push(event);
        }
        anyhow::ensure!(!events.is_empty(), "{} holds no events", path.display());
        Ok(Self::Sample(events))
    }

    /// `n` events as (event id, raw JSON line).
    pub(crate) fn lines(&self, seed: u64, n: usize) -> Vec<(String, String)> {
        match self {
            // Untimed, as samples are: a later run's events are newer in the cache than
            // an earlier run's of the same entity, so each run's reach it.
            Self::Generated => events(seed, n, ENTITIES, Sample::raw_json_untimed),
            Self::Sample(sample) => (0..n)
                .map(|i| {
                    let mut event = sample[i % sample.len()].clone();
                    let id = format!("bench-{seed}-{i}");
                    event.insert("event_id".into(), id.clone().into());
                    (id, serde_json::Value::Object(event).to_string())
                })
                .collect(),
        }
    }
}

/// Count and sum of the micro-batcher's batch-size histogram (events per batch).
fn batches(registry: &prometheus::Registry) -> (u64, f64) {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "lanes_micro_batcher_batch_size_events")
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_histogram())
        .fold((0, 0.0), |(n, sum), h| {
            (n + h.get_sample_count(), sum + h.get_sample_sum())
        })
}

/// One window setting's results.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Setting {
    pub(crate) max_delay_ms: u64,
    pub(crate) max_events: usize,
    /// Events/s draining a burst.
    pub(crate) burst_events_per_s: f64,
    pub(crate) points: Vec<Point>,
    /// The run at half of `burst_events_per_s`, when asked for.
    pub(crate) half_peak: Option<Point>,
}

/// One offered rate's results under a setting.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Point {
    pub(crate) rate: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) mean_batch: f64,
    /// p50 and p99 (ms) of each of [`STAGES`].
    pub(crate) stages: [(f64, f64); 4],
    /// Event to its prediction in Redis; `None` when no entry holds one of the run's
    /// events.
    pub(crate) to_cache: Option<ToCache>,
}

/// Publish-to-Redis latency over each entity's last event of a run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToCache {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Entities whose entry holds one of the run's events.
    pub(crate) entities: usize,
}

impl Point {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "rate_events_per_s": self.rate,
            "latency_p50_ms": self.p50_ms,
            "latency_p99_ms": self.p99_ms,
            "mean_batch_events": self.mean_batch,
            "stages": STAGES.iter().zip(self.stages).map(|(name, (p50, p99))| {
                (name.to_string(), json!({"p50_ms": p50, "p99_ms": p99}))
            }).collect::<serde_json::Map<_, _>>(),
            "event_to_cache": self.to_cache.as_ref().map(|c| json!({
                "p50_ms": c.p50_ms,
                "p99_ms": c.p99_ms,
                "entities": c.entities,
            })),
        })
    }

    /// The figure goal 4 is judged by: p99 event-to-cache.
    fn to_cache_p99(&self) -> Option<f64> {
        self.to_cache.as_ref().map(|c| c.p99_ms)
    }
}

impl Setting {
    pub(crate) fn label(&self) -> String {
        format!("{} ms / {} events", self.max_delay_ms, self.max_events)
    }

    /// The latency goal at half the peak rate: the window's delay plus 25 ms.
    fn half_peak_goal_ms(&self) -> f64 {
        self.max_delay_ms as f64 + GOAL_OVER_WINDOW_MS
    }

    fn worst_p99(&self) -> f64 {
        self.points
            .iter()
            .map(|p| p.p99_ms)
            .fold(f64::NAN, f64::max)
    }

    /// Geometric mean of the mean batch over the rates: every rate weighs the same,
    /// whatever its scale.
    fn batching(&self) -> f64 {
        let logs: f64 = self.points.iter().map(|p| p.mean_batch.max(1.0).ln()).sum();
        (logs / self.points.len().max(1) as f64).exp()
    }

    fn meets(&self, target_ms: f64) -> bool {
        !self.points.is_empty() && self.points.iter().all(|p| p.p99_ms <= target_ms)
    }
}

/// The setting to recommend for `target_ms`, and whether it meets it: of the settings
/// whose p99 is within the target at every rate, the one that batches most (fewer,
/// larger batches: less CPU and fewer model calls per event), then the one that drains
/// a burst fastest; when none meets it, the one with the lowest worst p99.
pub(crate) fn recommend(settings: &[Setting], target_ms: f64) -> Option<(usize, bool)> {
    let meeting = settings
        .iter()
        .enumerate()
        .filter(|(_, s)| s.meets(target_ms))
        .max_by(|(_, a), (_, b)| {
            a.batching()
                .total_cmp(&b.batching())
                .then(a.burst_events_per_s.total_cmp(&b.burst_events_per_s))
        });
    if let Some((i, _)) = meeting {
        return Some((i, true));
    }
    settings
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.points.is_empty())
        .min_by(|(_, a), (_, b)| a.worst_p99().total_cmp(&b.worst_p99()))
        .map(|(i, _)| (i, false))
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub async fn run(args: BenchArgs, settings: &Settings) -> anyhow::Result<()> {
    let mut settings = settings.clone();
    if let Some(model) = &args.model {
        settings.model.dir = model.clone();
        settings.model.version = "latest".into();
        settings.model.shadow_version.clear();
    }
    // Refuse a model that does not load before any run starts.
    let (model, _) = settings
        .model
        .load()
        .with_context(|| format!("loading the model from {}", settings.model.dir.display()))?;
    let spec = model.spec.clone();
    let source = match &args.events {
        Some(path) => Source::sample(path, &settings)?,
        None => Source::Generated,
    };
    let target_ms = args
        .target_ms
        .or(settings.micro_batcher.target_latency_ms)
        .unwrap_or(100) as f64;
    let settings = &settings;
    eprintln!(
        "raw broker rates ({} messages of 200 bytes) ...",
        args.raw_messages
    );
    let (produce, consume) = raw_rates(settings, args.raw_messages).await?;
    let hop = one_hop(settings, args.hop_messages).await?;
    let (hop50, hop99) = (percentile(&hop, 0.5), percentile(&hop, 0.99));
    let mut results = Vec::new();
    let mut seed = now_millis() as u64;
    for &delay in &args.delays {
        for &size in &args.sizes {
            let mut s = unique(settings, &format!("d{delay}-n{size}"));
            s.micro_batcher.max_delay_ms = delay;
            s.micro_batcher.max_events = size;
            s.micro_batcher.target_latency_ms = None;
            eprintln!("window max_delay {delay} ms, max_events {size} ...");
            let lane = Lane::start(s, &lanes_services::all()).await?;
            seed += 1;
            let secs = drive(&lane, source.lines(seed, args.burst), None)
                .await?
                .secs;
            let burst_events_per_s = (args.burst as f64 / secs).round();
            let mut points = Vec::new();
            for &rate in &args.rates {
                seed += 1;
                points.push(paced(&lane, &source, seed, rate, args.seconds).await?);
            }
            let half_peak = if args.half_peak {
                seed += 1;
                let rate = (burst_events_per_s / 2.0).round().max(1.0) as usize;
                eprintln!("  at half its peak rate, {rate} events/s ...");
                Some(paced(&lane, &source, seed, rate, args.seconds).await?)
            } else {
                None
            };
            let s = lane.settings.clone();
            lane.stop().await?;
            forget_keys(&s).await?;
            results.push(Setting {
                max_delay_ms: delay,
                max_events: size,
                burst_events_per_s,
                points,
                half_peak,
            });
        }
    }
    let best = recommend(&results, target_ms);
    let rows: Vec<_> = results
        .iter()
        .map(|r| {
            json!({
                "max_delay_ms": r.max_delay_ms,
                "max_events": r.max_events,
                "throughput_events_per_s": r.burst_events_per_s,
                "rates": r.points.iter().map(Point::to_json).collect::<Vec<_>>(),
                "meets_target": r.meets(target_ms),
                "half_peak": r.half_peak.as_ref().map(|p| {
                    let mut half = p.to_json();
                    half["goal_p99_ms"] = json!(r.half_peak_goal_ms());
                    half["meets_goal"] = json!(p.to_cache_p99().is_some_and(|p99| p99 <= r.half_peak_goal_ms()));
                    half
                }),
            })
        })
        .collect();
    let title = format!(
        "lanes bench: model {} v{}, {} events",
        spec.name,
        spec.version,
        match &args.events {
            Some(p) => format!(
                "from {}",
                p.file_name().map_or(p.display().to_string(), |f| f
                    .to_string_lossy()
                    .into_owned())
            ),
            None => "generated".into(),
        }
    );
    crate::bench_plot::draw(&args.plot, &title, &results, target_ms, best)?;
    let report = json!({
        "raw_broker": {
            "produce_msgs_per_s": produce.round(),
            "consume_msgs_per_s": consume.round(),
            "message_bytes": 200,
            "one_hop_p50_ms": round1(hop50),
            "one_hop_p99_ms": round1(hop99),
        },
        "model": {"name": spec.name, "version": spec.version, "dir": model.dir},
        "events": args.events.as_ref().map_or("generated".into(), |p| p.display().to_string()),
        "target_p99_ms": target_ms,
        "lane": rows,
        "recommended": best.map(|(i, meets)| json!({
            "max_delay_ms": results[i].max_delay_ms,
            "max_events": results[i].max_events,
            "meets_target": meets,
        })),
        "events_per_throughput_run": args.burst,
        "plot": args.plot,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;

    println!("{title}");
    println!(
        "raw broker, one client, 200-byte messages: produce {produce:.0} msg/s, consume {consume:.0} msg/s, one hop p50 {hop50:.1} ms, p99 {hop99:.1} ms"
    );
    println!();
    println!(
        "| max_delay_ms | max_events | events/s (burst of {}) | rate/s | p50 ms | p99 ms | events/batch | to cache p50 / p99 ms |",
        args.burst
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        for p in &r.points {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.max_delay_ms,
                r.max_events,
                r.burst_events_per_s,
                p.rate,
                p.p50_ms,
                p.p99_ms,
                p.mean_batch,
                p.to_cache
                    .as_ref()
                    .map_or("-".into(), |c| format!("{} / {}", c.p50_ms, c.p99_ms))
            );
        }
    }
    println!();
    // Each service's share, by when it produced its record (the window is in the
    // micro-batcher's): which stage's client settings are worth changing.
    println!(
        "where the latency goes, p50 / p99 ms by stage (publish to ingest's event, to the batch, to the prediction, to the reader):"
    );
    println!();
    println!("| max_delay_ms | max_events | rate/s | ingest | micro-batcher | scorer | delivery |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        for p in &r.points {
            let cells: Vec<String> = p
                .stages
                .iter()
                .map(|(p50, p99)| format!("{p50} / {p99}"))
                .collect();
            println!(
                "| {} | {} | {} | {} |",
                r.max_delay_ms,
                r.max_events,
                p.rate,
                cells.join(" | ")
            );
        }
    }
    println!();
    if results.iter().any(|r| r.half_peak.is_some()) {
        println!(
            "| goal: p99 event-to-cache at half the peak rate | measured | target | event-to-prediction p99 |"
        );
        println!("|---|---:|---:|---:|");
        for r in &results {
            if let Some(p) = &r.half_peak {
                println!(
                    "| max_delay_ms {}, max_events {}, {} events/s | {} | <= {} ms | {} ms |",
                    r.max_delay_ms,
                    r.max_events,
                    p.rate,
                    p.to_cache.as_ref().map_or("no entry".into(), |c| format!(
                        "{} ms ({} entities)",
                        c.p99_ms, c.entities
                    )),
                    r.half_peak_goal_ms(),
                    p.p99_ms
                );
            }
        }
        println!();
    }
    match best {
        Some((i, true)) => println!(
            "recommended for p99 <= {target_ms} ms: micro_batcher.max_delay_ms = {}, max_events = {}",
            results[i].max_delay_ms, results[i].max_events
        ),
        Some((i, false)) => println!(
            "no setting holds p99 <= {target_ms} ms at every rate; closest: max_delay_ms = {}, max_events = {} (worst p99 {} ms)",
            results[i].max_delay_ms,
            results[i].max_events,
            results[i].worst_p99()
        ),
        None => println!("no setting was measured"),
    }
    println!(
        "written to {} and {}",
        args.out.display(),
        args.plot.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(delay: u64, size: usize, burst: f64, points: &[(usize, f64, f64)]) -> Setting {
        Setting {
            max_delay_ms: delay,
            max_events: size,
            burst_events_per_s: burst,
            points: points
                .iter()
                .map(|&(rate, p99_ms, mean_batch)| Point {
                    rate,
                    p50_ms: p99_ms / 2.0,
                    p99_ms,
                    mean_batch,
                    stages: [(0.0, 0.0); 4],
                    to_cache: None,
                })
                .collect(),
            half_peak: None,
        }
    }

    #[test]
    fn an_events_latency_splits_into_stages_by_its_records_create_times() {
        let times = |pairs: &[(&str, i64)]| -> HashMap<String, i64> {
            pairs.iter().map(|&(id, t)| (id.to_string(), t)).collect()
        };
        let sent = times(&[("a", 1000), ("b", 1004), ("lost", 1002)]);
        let events = times(&[("a", 1012), ("b", 1013), ("lost", 1014)]);
        // Both in one batch, closed 20 ms after the first arrived.
        let batches = times(&[("a", 1032), ("b", 1032)]);
        let predictions = times(&[("a", 1040), ("b", 1040), ("other", 1041)]);
        let arrived = times(&[("a", 1055), ("b", 1051)]);
        let [ingest, batcher, scorer, delivery] =
            stages(&sent, &events, &batches, &predictions, &arrived);
        // "lost" never reached a batch: left out of every stage, not counted as zero.
        assert_eq!(ingest, vec![9.0, 12.0]);
        assert_eq!(batcher, vec![19.0, 20.0]);
        assert_eq!(scorer, vec![8.0, 8.0]);
        assert_eq!(delivery, vec![11.0, 15.0]);
    }

    #[test]
    fn the_setting_that_batches_most_within_the_target_is_recommended() {
        let sweep = [
            // Short window: within the target, small batches.
            setting(5, 64, 30_000.0, &[(200, 30.0, 1.2), (5000, 35.0, 20.0)]),
            // Longer window: within the target, larger batches.
            setting(20, 512, 28_000.0, &[(200, 45.0, 4.0), (5000, 48.0, 90.0)]),
            // Long window: the largest batches, but over the target at low rate.
            setting(
                100,
                512,
                31_000.0,
                &[(200, 120.0, 20.0), (5000, 60.0, 400.0)],
            ),
        ];
        assert_eq!(recommend(&sweep, 50.0), Some((1, true)));
        // A tighter target leaves only the short window.
        assert_eq!(recommend(&sweep, 40.0), Some((0, true)));
        // A loose one admits the long window, which batches most.
        assert_eq!(recommend(&sweep, 150.0), Some((2, true)));
    }

    #[test]
    fn with_no_setting_within_the_target_the_closest_is_named_as_missing_it() {
        let sweep = [
            setting(20, 64, 30_000.0, &[(200, 45.0, 4.0), (5000, 70.0, 30.0)]),
            setting(5, 64, 30_000.0, &[(200, 31.0, 1.2), (5000, 52.0, 20.0)]),
        ];
        assert_eq!(recommend(&sweep, 10.0), Some((1, false)));
        assert_eq!(recommend(&[], 10.0), None);
    }

    #[test]
    fn equal_batching_goes_to_the_faster_burst() {
        let sweep = [
            setting(5, 64, 20_000.0, &[(1000, 20.0, 8.0)]),
            setting(5, 512, 35_000.0, &[(1000, 20.0, 8.0)]),
        ];
        assert_eq!(recommend(&sweep, 50.0), Some((1, true)));
    }

    #[test]
    fn the_plot_has_a_curve_per_setting_and_marks_the_recommendation() {
        let sweep = [
            setting(5, 64, 30_000.0, &[(200, 30.0, 1.2), (5000, 35.0, 20.0)]),
            setting(20, 512, 28_000.0, &[(200, 45.0, 4.0), (5000, 48.0, 90.0)]),
        ];
        let svg = crate::bench_plot::render("sweep", &sweep, 50.0, Some((1, true))).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("5 ms / 64 events"), "{svg}");
        assert!(svg.contains("20 ms / 512 events (recommended)"), "{svg}");
        assert!(svg.contains("target 50 ms"), "{svg}");
        // Two curves in each panel, and the target line.
        assert!(svg.matches("<polyline").count() >= 5, "{svg}");
    }

    #[test]
    fn sample_events_get_their_own_ids_and_no_event_time() {
        let mut event = serde_json::Map::new();
        event.insert("entity_id".into(), "card-1".into());
        let source = Source::Sample(vec![event]);
        let lines = source.lines(7, 3);
        assert_eq!(lines.len(), 3);
        let ids: std::collections::HashSet<_> = lines.iter().map(|(id, _)| id).collect();
        assert_eq!(ids.len(), 3, "{lines:?}");
        for (id, line) in &lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["event_id"], id.as_str());
            assert_eq!(v["entity_id"], "card-1");
            assert!(v.get("event_time").is_none());
        }
    }
}
