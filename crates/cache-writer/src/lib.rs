//! `lanes-cache-writer`: `Prediction`s from `lanes.predictions` become one Redis hash per
//! entity (`<key_prefix><entity_id>`), written in pipelines. Beside the prediction, the
//! same hash keeps the entity's latest features from `lanes.events` (`features`,
//! `features_event_time`; its own consumer group), so the real-time path reads both in
//! one round trip and never joins a slower store. Of an entity's events within one
//! pipeline only the newest is sent: the others could not change the entry.
//!
//! The cache is monotonic: a Lua script, atomic in Redis, writes a prediction only if
//! its event time is newer than the cached one (ties: a later `scored_at`), so replays
//! and late results never roll the cache back. A prediction the cache already holds
//! (same event id, same model version) is a duplicate and changes nothing, so a replay
//! or a re-run batch job leaves the cache as it was. Offsets are committed only after Redis
//! replied. A connection-level Redis error (or a passing server state: loading, OOM, a
//! flushed script cache) retries the pipeline with backoff, never committing or
//! dead-lettering it; while it lasts the consumer pauses and stays in its group. A key
//! Redis refuses for good (WRONGTYPE, a script error) dead-letters just that input as
//! CACHE_WRITE_ERROR. The contract itself (key, scripts, fields) is [`cache`]'s.

mod metrics;

use std::time::Instant;

use anyhow::Context;
use lanes_common::cache::{self, Written};
use lanes_common::dlq::{ErrorClass, header_str};
use lanes_common::error::Failure;
use lanes_common::features::FeatureIndex;
use lanes_common::kafka;
use lanes_common::model::ModelSpec;
use lanes_common::records::{
    Event, Prediction, check_client_time, check_ids, check_not_ahead, now_millis, unusable_event,
};
use lanes_common::retry;
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::source::RecordHeaders;
use lanes_common::stage::{self, Input, Interrupted, Out, Plan, Stage};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use redis::aio::ConnectionManager;

use crate::metrics::Metrics;

pub const SERVICE: &str = "cache-writer";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.cache_writer,
        needs_redis: true,
        inputs: |s| {
            let mut inputs = vec![(s.cache_writer.group.clone(), s.topics.predictions.clone())];
            if s.cache_writer.online_features {
                inputs.push((features_group(s), s.topics.events.clone()));
            }
            inputs
        },
        group: |s| &mut s.cache_writer.group,
        run: |ctx| Box::pin(run(ctx)),
    }
}

/// The consumer group of the online-features loop.
fn features_group(s: &lanes_common::Settings) -> String {
    format!("{}-features", s.cache_writer.group)
}

/// What one consumer loop writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Predictions,
    Features,
}

enum Item {
    /// With the guard of a prediction scored from a request's own features.
    Prediction(Prediction, bool),
    Event(Event),
}

struct Writer {
    /// Any writer can reach the input topics: times far ahead would pin entries.
    max_clock_skew_ms: u64,
    redis: ConnectionManager,
    script: redis::Script,
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
    // The model's features: what an entry's online features must hold for the responder
    // to score from them, and all they keep. Read first: a bad `model.dir` fails at once.
    let model_features = match mode {
        Mode::Features => Some(ModelSpec::read(&s.model.resolve()?)?.features),
        Mode::Predictions => None,
    };
    let client = cache::client(&s.redis).context("redis")?;
    let redis = match connect(&client, &ctx).await {
        Ok(c) => c,
        // Stopped before Redis ever answered: nothing was read, nothing is owed.
        Err(e) if ctx.shutdown.is_cancelled() => {
            tracing::info!(error = %e, "stopped while waiting for redis");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let (topic, group, script) = match mode {
        Mode::Predictions => (
            &s.topics.predictions,
            s.cache_writer.group.clone(),
            cache::WRITE_IF_NEWER,
        ),
        Mode::Features => (
            &s.topics.events,
            features_group(s),
            cache::FEATURES_IF_NEWER,
        ),
    };
    let io = stage::io(&ctx, SERVICE, metrics.dead_letters.clone())?;
    let w = Writer {
        max_clock_skew_ms: s.ingest.max_clock_skew_ms,
        redis,
        script: redis::Script::new(script),
        prefix: s.cache_writer.key_prefix.clone(),
        ttl: s.cache_writer.ttl_seconds,
        metrics,
    };
    tracing::info!(prefix = %w.prefix, ttl = w.ttl, ?mode, %topic, "cache-writer running");
    let mut plan = Plan::new(&ctx, SERVICE, &group, &[topic]);
    plan.max_batch = s.cache_writer.max_pipeline.max(1);
    if mode == Mode::Predictions {
        // The guard header (see `PredictionStage`).
        plan.headers = RecordHeaders::Keep;
    }
    match model_features {
        None => stage::run(&ctx, plan, PredictionStage(w), io).await,
        Some(features) => {
            let stage = FeatureStage(w, FeatureIndex::new(features));
            stage::run(&ctx, plan, stage, io).await
        }
    }
}

/// Connects, retrying while Redis is down, until shutdown.
async fn connect(
    client: &redis::Client,
    ctx: &ServiceContext,
) -> anyhow::Result<ConnectionManager> {
    retry::retrying("connecting to redis", &ctx.shutdown, || async {
        ConnectionManager::new(client.clone())
            .await
            .map_err(|e| cache::classify(&e))
    })
    .await
    .context("connecting to redis")
}

struct PredictionStage(Writer);
struct FeatureStage(Writer, FeatureIndex);

impl Stage for PredictionStage {
    type Input = Prediction;

    async fn handle(
        &mut self,
        inputs: Vec<Input<Prediction>>,
        out: &mut Out<'_>,
    ) -> anyhow::Result<()> {
        let now = now_millis();
        // Sized up front: a filtered collect would regrow, moving every pair each time.
        let mut items = Vec::with_capacity(inputs.len());
        items.extend(
            inputs
                .into_iter()
                .filter_map(|i| match self.0.check(&i.record, now) {
                    Ok(()) => Some(i),
                    Err((class, reason)) => {
                        out.dead_letter(i.message, class, reason);
                        None
                    }
                })
                .map(|i| {
                    let guard = i
                        .message
                        .headers()
                        .is_some_and(|h| header_str(h, cache::HEADER_GUARD).is_some());
                    (i.message, Item::Prediction(i.record, guard))
                }),
        );
        self.0.write(items, Vec::new(), out).await
    }
}

impl Stage for FeatureStage {
    type Input = Event;

    async fn handle(&mut self, inputs: Vec<Input<Event>>, out: &mut Out<'_>) -> anyhow::Result<()> {
        let now = now_millis();
        let skew = self.0.max_clock_skew_ms;
        let mut checked = Vec::with_capacity(inputs.len());
        let index = &self.1;
        checked.extend(inputs.into_iter().filter_map(|mut i| {
            match check_event(&i.record, index, now, skew) {
                Ok(()) => {
                    // Every model feature is there: any more are not the model's.
                    if i.record.features.len() > index.sorted().len() {
                        i.record.features.retain(|name| index.contains(name));
                    }
                    Some(i)
                }
                Err((class, reason)) => {
                    out.dead_letter(i.message, class, reason);
                    None
                }
            }
        }));
        let newest = {
            let keys: Vec<(&str, i64)> = checked
                .iter()
                .map(|i| (i.record.entity_id.as_str(), i.record.event_time))
                .collect();
            cache::newest_per_entity(&keys)
        };
        // Each entity's newest event is written; the others wait for its reply.
        let mut slot = vec![0; checked.len()];
        let mut items = Vec::with_capacity(checked.len());
        let mut superseded = Vec::new();
        for (i, input) in checked.into_iter().enumerate() {
            if newest[i] == i {
                slot[i] = items.len();
                items.push((input.message, Item::Event(input.record)));
            } else {
                superseded.push((input.message, newest[i]));
            }
        }
        for (_, newer) in &mut superseded {
            *newer = slot[*newer];
        }
        self.0.write(items, superseded, out).await
    }
}

/// What an entry's online features may not come from: an event the model cannot use
/// ([`unusable_event`]; the responder scores stale entries from these features, and a
/// value JSON cannot hold would leave them unreadable), or one whose time is far ahead
/// (it would outrank every later event).
fn check_event(
    e: &Event,
    index: &FeatureIndex,
    now: i64,
    skew: u64,
) -> Result<(), (ErrorClass, String)> {
    if let Some(unusable) = unusable_event(e, index) {
        return Err(unusable);
    }
    check_client_time("event_time", e.event_time, now, skew)
        .map_err(|reason| (ErrorClass::InvalidEventTime, reason))
}

impl Writer {
    /// What no cache entry may hold: no entity, ids over their limits, a score that is not finite, an event time
    /// far ahead (it would outrank every later event), a scoring time far ahead (readers
    /// age an entry from it, so it would stay fresh however old it grew).
    fn check(&self, p: &Prediction, now: i64) -> Result<(), (ErrorClass, String)> {
        check_ids(&p.entity_id, &p.event_id)?;
        if let Some(reason) = cache::overlong([
            ("model_name", p.model_name.as_str()),
            ("model_version", &p.model_version),
            ("label", p.label.as_deref().unwrap_or_default()),
        ]) {
            return Err((ErrorClass::TooLarge, reason));
        }
        if !p.score.is_finite() {
            return Err((
                ErrorClass::ModelError,
                format!("score {} is not finite", p.score),
            ));
        }
        check_client_time("event_time", p.event_time, now, self.max_clock_skew_ms)
            .and_then(|()| check_not_ahead("scored_at", p.scored_at, now, self.max_clock_skew_ms))
            .map_err(|e| (ErrorClass::InvalidEventTime, e))
    }

    /// One script call for `items` (all predictions or all events), retried while
    /// Redis is away or passing through a state (out of memory): each key's reply.
    async fn invoke(
        &mut self,
        items: &[&Item],
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Vec<Result<Written, Failure>>, Failure> {
        let invocation = match items.first() {
            Some(Item::Prediction(..)) => cache::write_predictions(
                &self.script,
                &self.prefix,
                items.iter().filter_map(|item| match item {
                    Item::Prediction(p, guard) => Some((p, *guard)),
                    Item::Event(_) => None,
                }),
                self.ttl,
            ),
            _ => cache::write_features(
                &self.script,
                &self.prefix,
                items.iter().filter_map(|item| match item {
                    Item::Event(e) => Some((e.entity_id.as_str(), &e.features, e.event_time)),
                    Item::Prediction(..) => None,
                }),
                self.ttl,
            ),
        };
        let (redis, metrics, keys) = (&mut self.redis, &self.metrics, items.len());
        retry::retrying("redis write", stop, || {
            let started = Instant::now();
            let mut conn = redis.clone();
            let invocation = &invocation;
            async move {
                let reply: redis::Value = invocation.invoke(&mut conn).await.map_err(|e| {
                    metrics.redis_errors.inc();
                    cache::classify(&e)
                })?;
                let replies = cache::replies(reply, keys)?;
                // A key's error of a passing kind (out of memory) retries the whole call:
                // the script is idempotent.
                if let Some(e) = replies
                    .iter()
                    .filter_map(|r| r.as_ref().err())
                    .find(|e| e.is_transient())
                {
                    metrics.redis_errors.inc();
                    return Err(e.clone());
                }
                metrics
                    .pipeline_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(replies)
            }
        })
        .await
    }

    /// Writes a chunk in one script call, retrying until Redis answers, and marks each
    /// input done; a key Redis refuses (WRONGTYPE) is dead-lettered alone. Each of
    /// `superseded` (an input and the index in `good` of a newer one of its entity) is
    /// done or dead-lettered as that one is.
    async fn write(
        &mut self,
        good: Vec<(OwnedMessage, Item)>,
        superseded: Vec<(OwnedMessage, usize)>,
        out: &mut Out<'_>,
    ) -> anyhow::Result<()> {
        if good.is_empty() {
            return Ok(());
        }
        let items: Vec<&Item> = good.iter().map(|(_, item)| item).collect();
        let stop = out.stop().clone();
        let results = match self.invoke(&items, &stop).await {
            Ok(r) => r,
            // The whole call refused for good, by an error that is no passing state (a key
            // the script cannot read answers on its own, not for the call). Alone, the
            // item is dead-lettered with it: stopping would read it again after every
            // restart.
            Err(e @ Failure::Poison { .. }) if items.len() == 1 => vec![Err(e)],
            // Among others, they are written one by one so only an item it was
            // refused for is.
            Err(Failure::Poison { message, .. }) => {
                tracing::warn!(items = items.len(), error = %message, "a cache write call was refused; writing its items one by one");
                let mut each = Vec::with_capacity(items.len());
                for item in &items {
                    each.push(match self.invoke(std::slice::from_ref(item), &stop).await {
                        Ok(mut r) => r.pop().expect("one reply per key"),
                        Err(e @ Failure::Poison { .. }) => Err(e),
                        Err(e) => return Err(not_written(e, 1, &stop)),
                    });
                }
                each
            }
            Err(e) => return Err(not_written(e, items.len(), &stop)),
        };
        let predictions = matches!(good.first(), Some((_, Item::Prediction(..))));
        let mut replaced = 0;
        for (m, newer) in superseded {
            match &results[newer] {
                Ok(_) => {
                    replaced += 1;
                    out.done(&m);
                }
                Err(e) => out.dead_letter(m, ErrorClass::CacheWriteError, e.to_string()),
            }
        }
        let now = now_millis();
        // Outcomes are counted per call: a label lookup per item hashed the label each time.
        let mut outcomes = [0u64; Written::ALL.len()];
        for ((m, item), reply) in good.into_iter().zip(results) {
            let written = match reply {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(key = %cache::key(&self.prefix, item.entity()), error = %e, "redis refused a key");
                    out.dead_letter(m, ErrorClass::CacheWriteError, e.to_string());
                    continue;
                }
            };
            outcomes[written as usize] += 1;
            // A time no clock gave (before 2000, far ahead) would sit in the histogram's
            // sum for good; such a prediction is written but not timed.
            if let Item::Prediction(p, _) = &item
                && let Some(ingested) = p.ingested_at
                && check_client_time("ingested_at", ingested, now, self.max_clock_skew_ms).is_ok()
            {
                self.metrics
                    .ingest_to_cache
                    .observe(now.saturating_sub(ingested).max(0) as f64 / 1000.0);
            }
            out.done(&m);
        }
        let counter = match predictions {
            true => &self.metrics.writes,
            false => &self.metrics.feature_writes,
        };
        for (written, n) in Written::ALL.into_iter().zip(outcomes) {
            if n > 0 {
                counter.with_label_values(&[written.as_str()]).inc_by(n);
            }
        }
        if replaced > 0 {
            counter
                .with_label_values(&["superseded"])
                .inc_by(replaced as u64);
        }
        Ok(())
    }
}

/// The error that stops the loop when `n` inputs could not be written.
fn not_written(e: Failure, n: usize, stop: &tokio_util::sync::CancellationToken) -> anyhow::Error {
    let e = format!("{n} inputs not written: {e}");
    match stop.is_cancelled() {
        // Stopped while Redis was away: not done, so read again after a restart.
        true => anyhow::Error::new(Interrupted(e)),
        false => anyhow::anyhow!(e),
    }
}

impl Item {
    fn entity(&self) -> &str {
        match self {
            Item::Prediction(p, _) => &p.entity_id,
            Item::Event(e) => &e.entity_id,
        }
    }
}
