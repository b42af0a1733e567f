//! `lanes-cache-writer`: `Prediction`s from `lanes.predictions` become one Redis hash per
//! entity (`<key_prefix><entity_id>`), written in pipelines. Beside the prediction, the
//! same hash keeps the entity's latest features from `lanes.events` (`features`,
//! `features_event_time`; its own consumer group), so the real-time path reads both in
//! one round trip and never joins a slower store.
//!
//! The cache is monotonic: a Lua script, atomic in Redis, writes a prediction only if
//! its event time is newer than the cached one (ties: a later `scored_at`), so replays
//! and late results never roll the cache back. A prediction the cache already holds
//! (same event id, same model version) is a duplicate and changes nothing, so a replay
//! or a re-run batch job leaves the cache as it was. Offsets are committed only after Redis
//! replied; on a Redis error the same predictions are retried with backoff, never
//! committed and never dead-lettered.

use std::time::{Duration, Instant};

use anyhow::Context;
use lanes_common::avro::{AvroCodec, DecodeError};
use lanes_common::dlq::DlqWriter;
use lanes_common::kafka;
use lanes_common::records::{Event, Lane, Prediction, now_millis};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::source::{Acks, Source, SourceEvent};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use redis::aio::ConnectionManager;

pub const SERVICE: &str = "cache-writer";

/// KEYS[1]: the entity's hash. ARGV: event_time, ttl_seconds, features JSON. Newest
/// event time wins; equal times keep what is there.
const FEATURES_IF_NEWER: &str = r"
local cached = redis.call('HGET', KEYS[1], 'features_event_time')
if cached and tonumber(ARGV[1]) <= tonumber(cached) then return 0 end
redis.call('HSET', KEYS[1], 'features_event_time', ARGV[1], 'features', ARGV[3])
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
";

/// KEYS[1]: the entity's hash. ARGV: event_time, scored_at, ttl_seconds, event_id,
/// model_version, then field/value pairs. Returns 1 when written, 0 when the cached
/// prediction is as new or newer, 2 when it is this very prediction (a duplicate).
/// `written_at` is Redis's own clock, so readers can measure event-to-cache latency.
const WRITE_IF_NEWER: &str = r"
local cached = redis.call('HMGET', KEYS[1], 'event_time', 'scored_at', 'event_id', 'model_version')
if cached[1] then
  if cached[3] == ARGV[4] and cached[4] == ARGV[5] then return 2 end
  local t, ct = tonumber(ARGV[1]), tonumber(cached[1])
  if t < ct then return 0 end
  if t == ct and tonumber(ARGV[2]) <= tonumber(cached[2] or '0') then return 0 end
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'written_at', now[1] * 1000 + math.floor(now[2] / 1000), unpack(ARGV, 6))
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.cache_writer,
        needs_redis: true,
        run: |ctx| Box::pin(run(ctx)),
    }
}

#[derive(Clone)]
struct Metrics {
    writes: IntCounterVec,
    feature_writes: IntCounterVec,
    redis_errors: IntCounter,
    pipeline_seconds: Histogram,
    ingest_to_cache: Histogram,
    dead_letters: IntCounterVec,
}

impl Metrics {
    fn new(r: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            writes: IntCounterVec::new(
                Opts::new(
                    "lanes_cache_writer_writes_total",
                    "Predictions applied to Redis, by result (written, stale: the cache held a newer one, duplicate: it held this one).",
                ),
                &["result"],
            )?,
            feature_writes: IntCounterVec::new(
                Opts::new(
                    "lanes_cache_writer_feature_writes_total",
                    "Online features applied to Redis, by result (written, stale).",
                ),
                &["result"],
            )?,
            redis_errors: IntCounter::new(
                "lanes_cache_writer_redis_errors_total",
                "Failed Redis pipelines (retried).",
            )?,
            pipeline_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_cache_writer_pipeline_seconds",
                    "Redis round trip per pipeline.",
                )
                .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 16)?),
            )?,
            ingest_to_cache: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_cache_writer_ingest_to_cache_seconds",
                    "From ingestion of the event to its prediction landing in Redis.",
                )
                .buckets(prometheus::exponential_buckets(0.001, 2.0, 16)?),
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "lanes_cache_writer_dead_letters_total",
                    "Predictions dead-lettered, by error class.",
                ),
                &["class"],
            )?,
        };
        lanes_common::metrics::zeroed(&m.writes, &["written", "stale", "duplicate"]);
        lanes_common::metrics::zeroed(&m.feature_writes, &["written", "stale"]);
        r.register(Box::new(m.writes.clone()))?;
        r.register(Box::new(m.feature_writes.clone()))?;
        r.register(Box::new(m.redis_errors.clone()))?;
        r.register(Box::new(m.pipeline_seconds.clone()))?;
        r.register(Box::new(m.ingest_to_cache.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        Ok(m)
    }
}

/// The Redis key of an entity's cached prediction.
pub fn cache_key(prefix: &str, entity_id: &str) -> String {
    format!("{prefix}{entity_id}")
}

/// The hash fields a prediction is stored as.
pub fn fields(p: &Prediction) -> Vec<(&'static str, String)> {
    let lane = match p.lane {
        Lane::Stream => "STREAM",
        Lane::Batch => "BATCH",
        Lane::Realtime => "REALTIME",
    };
    vec![
        ("score", p.score.to_string()),
        ("label", p.label.clone().unwrap_or_default()),
        ("model_name", p.model_name.clone()),
        ("model_version", p.model_version.clone()),
        ("event_id", p.event_id.clone()),
        ("event_time", p.event_time.to_string()),
        ("scored_at", p.scored_at.to_string()),
        ("lane", lane.to_string()),
        (
            "ingested_at",
            p.ingested_at.map(|t| t.to_string()).unwrap_or_default(),
        ),
    ]
}

/// What one consumer loop writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Predictions,
    Features,
}

enum Item {
    Prediction(Prediction),
    Event(Event),
}

struct Writer {
    mode: Mode,
    codec: AvroCodec,
    redis: ConnectionManager,
    script: redis::Script,
    dlq: DlqWriter,
    prefix: String,
    ttl: u64,
    metrics: Metrics,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let metrics = Metrics::new(&ctx.metrics)?;
    kafka::ensure_topics(
        &s.kafka,
        &[&s.topics.predictions, &s.topics.events, &s.topics.dlq],
    )
    .await
    .context("creating topics")?;
    let predictions = consume(ctx.clone(), Mode::Predictions, metrics.clone());
    if s.cache_writer.online_features {
        tokio::try_join!(predictions, consume(ctx.clone(), Mode::Features, metrics))?;
    } else {
        predictions.await?;
    }
    tracing::info!("cache-writer stopped");
    Ok(())
}

/// One consumer loop: predictions, or online features.
async fn consume(ctx: ServiceContext, mode: Mode, metrics: Metrics) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let client = redis::Client::open(s.redis.url.as_str()).context("redis.url")?;
    let redis = connect(&client, &ctx).await?;
    let producer = kafka::producer(&s.kafka, "lanes-cache-writer")?;
    let (topic, group, script) = match mode {
        Mode::Predictions => (
            &s.topics.predictions,
            s.cache_writer.group.clone(),
            WRITE_IF_NEWER,
        ),
        Mode::Features => (
            &s.topics.events,
            format!("{}-features", s.cache_writer.group),
            FEATURES_IF_NEWER,
        ),
    };
    let mut w = Writer {
        mode,
        codec: AvroCodec::new(&s.registry)?,
        redis,
        script: redis::Script::new(script),
        dlq: DlqWriter::new(producer, &s.topics.dlq, SERVICE)
            .with_counter(metrics.dead_letters.clone()),
        prefix: s.cache_writer.key_prefix.clone(),
        ttl: s.cache_writer.ttl_seconds,
        metrics,
    };
    let max = s.cache_writer.max_pipeline.max(1);
    let mut source = Source::start(
        &s.kafka,
        SERVICE,
        &group,
        &[topic],
        s.shutdown.drain_timeout(),
        Some(ctx.lag.clone()),
    )?;
    let mut acks = Acks::new();
    let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
    if mode == Mode::Predictions {
        ctx.ready.set(true);
    }
    tracing::info!(prefix = %w.prefix, ttl = w.ttl, ?mode, %topic, "cache-writer running");
    let mut chunk: Vec<OwnedMessage> = Vec::with_capacity(max);
    loop {
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(result) = acks.next() => result.map_err(anyhow::Error::msg).context("dead letter not acknowledged")?,
            event = source.events.recv() => {
                let mut next = event;
                // Take what is already waiting, up to one pipeline's worth.
                loop {
                    match next {
                        None => break,
                        Some(SourceEvent::Message(m)) => {
                            acks.track(&m);
                            chunk.push(m);
                        }
                        Some(SourceEvent::Assigned(_)) => {}
                        Some(SourceEvent::Revoked { partitions, done }) => {
                            w.write(std::mem::take(&mut chunk), &mut acks, &ctx).await?;
                            acks.release(&source.consumer, &partitions, done).await?;
                        }
                    }
                    if chunk.len() >= max {
                        break;
                    }
                    next = match source.events.try_recv() {
                        Ok(e) => Some(e),
                        Err(_) => break,
                    };
                }
                if !chunk.is_empty() {
                    w.write(std::mem::take(&mut chunk), &mut acks, &ctx).await?;
                }
            }
            _ = commit_tick.tick() => acks.commit(&source.consumer).await?,
        }
    }
    ctx.ready.set(false);
    acks.finish(source).await?;
    Ok(())
}

/// Connects, retrying while Redis is down, until shutdown.
async fn connect(
    client: &redis::Client,
    ctx: &ServiceContext,
) -> anyhow::Result<ConnectionManager> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match ConnectionManager::new(client.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if !ctx.shutdown.is_cancelled() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "redis unavailable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("connecting to redis"),
        }
    }
}

impl Writer {
    /// Decodes a chunk, writes its predictions in one pipeline (retrying until Redis
    /// answers), and acknowledges their offsets.
    async fn write(
        &mut self,
        chunk: Vec<OwnedMessage>,
        acks: &mut Acks,
        ctx: &ServiceContext,
    ) -> anyhow::Result<()> {
        let mut good: Vec<(OwnedMessage, Item)> = Vec::with_capacity(chunk.len());
        for m in chunk {
            let bytes = m.payload().unwrap_or_default();
            let decoded = match self.mode {
                Mode::Predictions => self
                    .codec
                    .decode_retrying::<Prediction>(bytes, &ctx.shutdown)
                    .await
                    .map(|d| Item::Prediction(d.record)),
                Mode::Features => self
                    .codec
                    .decode_retrying::<Event>(bytes, &ctx.shutdown)
                    .await
                    .map(|d| Item::Event(d.record)),
            };
            match decoded {
                Ok(item) => good.push((m, item)),
                Err(DecodeError::Poison { class, message }) => {
                    acks.dead_letter(&self.dlq, m, class, message)
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context("stopping with an undecoded record"));
                }
            }
        }
        if good.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&self.script).ignore();
        let invocations: Vec<redis::ScriptInvocation<'_>> = good
            .iter()
            .map(|(_, item)| match item {
                Item::Prediction(p) => {
                    let mut inv = self.script.key(cache_key(&self.prefix, &p.entity_id));
                    inv.arg(p.event_time)
                        .arg(p.scored_at)
                        .arg(self.ttl)
                        .arg(&p.event_id)
                        .arg(&p.model_version);
                    for (k, v) in fields(p) {
                        inv.arg(k).arg(v);
                    }
                    inv
                }
                Item::Event(e) => {
                    let mut inv = self.script.key(cache_key(&self.prefix, &e.entity_id));
                    let features = serde_json::to_string(&e.features).unwrap_or_default();
                    inv.arg(e.event_time).arg(self.ttl).arg(features);
                    inv
                }
            })
            .collect();
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        let mut backoff = Duration::from_millis(50);
        let results: Vec<i64> = loop {
            let started = Instant::now();
            match pipe.query_async::<Vec<i64>>(&mut self.redis).await {
                Ok(r) => {
                    self.metrics
                        .pipeline_seconds
                        .observe(started.elapsed().as_secs_f64());
                    break r;
                }
                Err(e) => {
                    self.metrics.redis_errors.inc();
                    if ctx.shutdown.is_cancelled() {
                        anyhow::bail!("stopping with {} predictions not written: {e}", good.len());
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "redis write failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let now = now_millis();
        for ((m, item), written) in good.iter().zip(results) {
            let result = match written {
                1 => "written",
                2 => "duplicate",
                _ => "stale",
            };
            match item {
                Item::Prediction(p) => {
                    self.metrics.writes.with_label_values(&[result]).inc();
                    if let Some(ingested) = p.ingested_at {
                        self.metrics
                            .ingest_to_cache
                            .observe((now - ingested).max(0) as f64 / 1000.0);
                    }
                }
                Item::Event(_) => self
                    .metrics
                    .feature_writes
                    .with_label_values(&[result])
                    .inc(),
            }
            acks.done(m.topic(), m.partition(), m.offset());
        }
        Ok(())
    }
}
