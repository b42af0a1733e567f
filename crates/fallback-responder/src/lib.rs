//! `lanes-fallback-responder`: answers each `PredictionRequest` from `lanes.requests` on
//! its `reply_topic` (else `lanes.responses`), keyed by request id, with the request's
//! headers copied for correlation. It is a [`Stage`] of the common runner.
//!
//! One Redis read (`HMGET` of the fields a reader uses: prediction and online features)
//! decides the path ([`decide`]): a fresh cached prediction is served (CACHE); a stale or
//! missing one is scored in-process with the scorer's model code from the request's or
//! the online features (REALTIME) and published to `lanes.predictions` so the cache
//! warms; with nothing to score, NOT_FOUND. Scoring that misses its deadline serves the
//! stale entry (STALE_CACHE) or an ERROR, per `on_deadline`. Concurrent misses for one
//! entity share one scoring ([`coalesce`]). Redis trouble trips a circuit breaker
//! ([`breaker`]) and requests are still answered by real-time scoring; a missing model
//! gives ERROR responses with the reason. Staleness is measured at every read and by a
//! periodic sampler, and old entries are refreshed on read and by a sweep ([`sweep`]).
//!
//! Requests are hostile until checked ([`answer`]): a `requested_at` far ahead or before
//! 2000, a request older than `max_request_age_ms`, or a `reply_topic` off the allow-list
//! or not a topic name or not on the broker gets an ERROR response on the default topic
//! ([`replies`]). Background work (refreshes, cache warming, scorings past their
//! deadline) counts against `max_in_flight` with the requests, so memory stays bounded
//! under any load.

pub mod answer;
pub mod breaker;
pub mod coalesce;
pub mod decide;
pub mod hits;
mod metrics;
pub use metrics::LOOKUP_RESULTS;
pub mod replies;
pub mod sweep;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lanes_common::avro::AvroCodec;
use lanes_common::cache::{self, Cached};
use lanes_common::config::FallbackResponderConfig;
use lanes_common::kafka::{self, delivered, enqueue};
use lanes_common::lifecycle::{self, ModelMetrics, ModelWatch};
use lanes_common::model::Model;
use lanes_common::producer::Producer;
use lanes_common::records::{Lane, Prediction, PredictionRequest, now_millis};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::source::RecordHeaders;
use lanes_common::stage::{self, Input, Out, Plan, Stage};
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use redis::aio::ConnectionManager;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::breaker::Breaker;
use crate::coalesce::SingleFlight;
use crate::decide::{Policy, Rollout};
use crate::metrics::Metrics;

pub const SERVICE: &str = "fallback-responder";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.fallback_responder,
        needs_redis: true,
        inputs: |s| {
            vec![(
                s.fallback_responder.group.clone(),
                s.topics.requests.clone(),
            )]
        },
        group: |s| &mut s.fallback_responder.group,
        run: |ctx| Box::pin(run(ctx)),
    }
}

/// Where a real-time score goes besides the answer: the cache, as a prediction.
#[derive(Debug, Clone)]
pub struct Warm {
    /// The event time the prediction claims: the online features' own, or for request
    /// features the responder's clock (never the client's).
    pub event_time: i64,
    pub event_id: String,
    /// Request features: never replace an entry whose online features are newer.
    pub guard: bool,
}

/// Counts one piece of background work for as long as it lives.
struct Busy {
    count: Arc<AtomicUsize>,
    gauge: prometheus::IntGauge,
    /// The slot this work holds until it is done.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Busy {
    fn start(core: &Core, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self::counting(
            core.background.clone(),
            core.metrics.background.clone(),
            slot,
        )
    }

    fn counting(
        count: Arc<AtomicUsize>,
        gauge: prometheus::IntGauge,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        let now = count.fetch_add(1, Ordering::Relaxed) + 1;
        gauge.set(now as i64);
        Self {
            count,
            gauge,
            _slot: slot,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.count.fetch_sub(1, Ordering::Relaxed) - 1;
        self.gauge.set(now as i64);
    }
}

/// One real-time scoring: score, label and the model version that gave them.
#[derive(Clone)]
pub struct Scoring {
    pub score: f64,
    pub label: String,
    pub model: Arc<Model>,
}

/// The outcome of one real-time scoring, shared by every request that joined it.
pub type Scored = Result<Scoring, String>;

/// Model, cache and producer, shared by request handlers, the sweep and the sampler.
pub struct Core {
    pub cfg: FallbackResponderConfig,
    /// The served model, swapped when a new version is loaded.
    model: Option<ModelWatch>,
    /// Why there is no model, for ERROR responses.
    model_error: Option<String>,
    redis_client: redis::Client,
    /// Connected on first use and kept; the manager reconnects by itself after that.
    redis: tokio::sync::Mutex<Option<ConnectionManager>>,
    redis_url: String,
    breaker: Mutex<Breaker>,
    pub prefix: String,
    codec: AvroCodec,
    producer: Producer,
    predictions_topic: String,
    responses_topic: String,
    reply_topics: Arc<answer::ReplyTopics>,
    responses_delivered: answer::LastDelivery,
    reply_listing: replies::Listing,
    flights: SingleFlight<Scored>,
    /// Scorings and cache warmings still running, whoever started them.
    background: Arc<AtomicUsize>,
    /// `max_in_flight` slots: an answer holds one while it works, and a scoring it
    /// starts carries it on until the scoring and its cache warming are done.
    slots: Arc<Semaphore>,
    /// The version served before the current one, for `rollout_grace_ms`.
    rollout: Mutex<Rollout>,
    pub metrics: Metrics,
    stop: tokio_util::sync::CancellationToken,
}

/// Feature names a request may carry, or the model's count if that is more, before it
/// is refused unread.
pub const MAX_REQUEST_FEATURES: usize = 1024;

impl Core {
    pub fn policy(&self) -> Policy {
        let model_version = self.model_version();
        let previous_version = self.rollout.lock().expect("rollout").observe(
            model_version.clone(),
            tokio::time::Instant::now(),
            Duration::from_millis(self.cfg.rollout_grace_ms),
        );
        Policy {
            freshness_ms: self.cfg.freshness_ms,
            refresh_after_ms: self.cfg.refresh_after_ms,
            model_version,
            previous_version,
        }
    }

    /// The version being served now, if a model is loaded.
    pub fn model_version(&self) -> Option<String> {
        self.model
            .as_ref()
            .map(|m| m.current().spec.version.clone())
    }

    /// The entity's entry in one round trip, through the circuit breaker. `Err` when the
    /// cache could not be asked.
    pub async fn read(&self, entity: &str) -> Result<Option<Cached>, String> {
        let key = cache::key(&self.prefix, entity);
        self.call(self.cfg.redis_timeout_ms, move |mut conn| async move {
            cache::read(&mut conn, &key).await
        })
        .await
    }

    /// One Redis call through the circuit breaker, failing after `timeout_ms`. The
    /// breaker counts its failures, so background work backs off with the requests.
    pub async fn call<T, F, Fut>(&self, timeout_ms: u64, f: F) -> Result<T, String>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let allowed = self
            .breaker
            .lock()
            .expect("breaker")
            .allow(tokio::time::Instant::now());
        if !allowed {
            return Err("cache circuit open".into());
        }
        let conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => {
                let mut breaker = self.breaker.lock().expect("breaker");
                return Err(self.cache_failed(&mut breaker, e));
            }
        };
        let result = tokio::time::timeout(Duration::from_millis(timeout_ms), f(conn)).await;
        let mut breaker = self.breaker.lock().expect("breaker");
        match result {
            Ok(Ok(v)) => {
                self.cache_answered(&mut breaker);
                Ok(v)
            }
            // The server answered, refusing this key or call alone (WRONGTYPE: another
            // client's key): the cache is up, so the breaker does not count it, and
            // requests for one odd key cannot open it for every other entity.
            Ok(Err(e)) if !cache::classify(&e).is_transient() => {
                self.metrics.redis_errors.inc();
                self.cache_answered(&mut breaker);
                Err(e.to_string())
            }
            Ok(Err(e)) => Err(self.cache_failed(&mut breaker, e.to_string())),
            Err(_) => {
                Err(self.cache_failed(&mut breaker, format!("no answer within {timeout_ms} ms")))
            }
        }
    }

    /// The Redis connection, connecting first if there is none yet.
    pub async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.redis.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let timeout = Duration::from_millis(self.cfg.redis_timeout_ms.max(1));
        match tokio::time::timeout(timeout, ConnectionManager::new(self.redis_client.clone())).await
        {
            Ok(Ok(c)) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => Err(format!("{}: {e}", self.redis_url)),
            Err(_) => Err(format!(
                "{}: no connection within {timeout:?}",
                self.redis_url
            )),
        }
    }

    fn cache_answered(&self, breaker: &mut Breaker) {
        breaker.success();
        self.metrics
            .breaker_state
            .set(breaker.state(tokio::time::Instant::now()).gauge());
    }

    fn cache_failed(&self, breaker: &mut Breaker, reason: String) -> String {
        let now = tokio::time::Instant::now();
        self.metrics.redis_errors.inc();
        if breaker.failure(now) {
            tracing::warn!(%reason, "cache circuit opened; answering by real-time scoring");
        }
        self.metrics.breaker_state.set(breaker.state(now).gauge());
        reason
    }

    /// Background work running now: scorings and cache warmings.
    pub fn busy(&self) -> usize {
        self.background.load(Ordering::Relaxed)
    }

    /// Whether background work may start: together with the requests it counts
    /// against `max_in_flight`.
    pub fn has_room(&self) -> bool {
        self.slots.available_permits() > 0
    }

    /// A free slot now, for background work that is skipped when there is none.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A slot for `req`, waited for in arrival order while the request can still be
    /// answered before it expires (`requested_at + max_request_age_ms` by this clock,
    /// less the longest an answer takes: a Redis read and a real-time scoring); `None`
    /// after that. So a responder offered more than it can score answers the rest
    /// "expired" on time rather than letting them queue past their callers' patience.
    pub async fn slot(&self, req: &PredictionRequest) -> Option<OwnedSemaphorePermit> {
        let slots = self.slots.clone();
        let max_age = self.cfg.max_request_age_ms as i64;
        if max_age == 0 {
            return slots.acquire_owned().await.ok();
        }
        let work = (self.cfg.redis_timeout_ms + self.cfg.realtime_deadline_ms) as i64;
        let left = req
            .requested_at
            .saturating_add(max_age - work)
            .saturating_sub(now_millis())
            .clamp(0, max_age);
        if left == 0 {
            return None;
        }
        tokio::time::timeout(Duration::from_millis(left as u64), slots.acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// Scores `features` for `entity` once however many ask at the same time. With a
    /// `warm` target the result is published as a REALTIME prediction so the cache
    /// warms; `guard` (request features) keeps it from replacing an entry whose online
    /// features are newer.
    /// `slot` goes to the scoring if this call starts it, and is freed if it joins one.
    /// A request's own features must name only the model's; online features may hold
    /// more (kept from before a model version that dropped one), which the model leaves.
    pub fn score(
        &self,
        core: &Arc<Core>,
        entity: &str,
        features: &BTreeMap<String, f64>,
        from_request: bool,
        warm: Option<Warm>,
        slot: OwnedSemaphorePermit,
    ) -> coalesce::Flight<Scored> {
        let key = format!(
            "{entity}\u{1f}{}\u{1f}{}\u{1f}{from_request}",
            serde_json::to_string(features).unwrap_or_default(),
            warm.is_some()
        );
        let (core, entity, features) = (core.clone(), entity.to_string(), features.clone());
        let (flight, started) = self.flights.join(&key, move || {
            let busy = Busy::start(&core, Some(slot));
            async move {
                let scored = core.score_now(&features, from_request).await;
                if let (Ok(scoring), Some(warm)) = (scored.clone(), warm) {
                    // Warming the cache must not delay the answer; it keeps the
                    // scoring's place in the in-flight count until it is done.
                    tokio::spawn(async move {
                        core.publish(&entity, &scoring, warm).await;
                        drop(busy);
                    });
                }
                scored
            }
        });
        if started {
            self.metrics.scorings.inc();
        }
        flight
    }

    /// Whether the serving model takes `features`: each of its features given, in range.
    /// Without a model, scoring says why.
    pub(crate) fn scorable(&self, features: &BTreeMap<String, f64>) -> bool {
        let Some(model) = self.model.as_ref().map(ModelWatch::current) else {
            return true;
        };
        model_row(&model.spec.features, features).is_ok()
    }

    /// A name among a request's `features` that the serving model does not take, when
    /// there are more of them than [`MAX_REQUEST_FEATURES`] and the model's: such a
    /// request is refused before its map is copied or keyed (fifty thousand names were,
    /// twice). A few names too many still go the usual way: a fresh entry answers them.
    pub(crate) fn too_many_features(&self, features: &BTreeMap<String, f64>) -> Option<String> {
        let model = self.model.as_ref().map(ModelWatch::current)?;
        if features.len() <= model.spec.features.len().max(MAX_REQUEST_FEATURES) {
            return None;
        }
        let extra = features.keys().find(|k| !model.index().contains(k))?;
        Some(format!(
            "unknown feature {:?}",
            lanes_common::dlq::truncate_str(extra, 256)
        ))
    }

    async fn score_now(&self, features: &BTreeMap<String, f64>, from_request: bool) -> Scored {
        let Some(model) = self.model.as_ref().map(ModelWatch::current) else {
            return Err(format!(
                "model unavailable: {}",
                self.model_error.as_deref().unwrap_or("not loaded")
            ));
        };
        let row = model_row(&model.spec.features, features)?;
        // By the model's index: a scan of its names per key grew with the square of a
        // wide model's width, on every request.
        if from_request && let Some(extra) = features.keys().find(|k| !model.index().contains(k)) {
            return Err(format!("unknown feature {extra:?}"));
        }
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let score = model.score(&row, 1)?[0];
            let label = model.label(score).to_string();
            Ok::<_, lanes_common::model::ModelError>(Scoring {
                score,
                label,
                model,
            })
        })
        .await
        .map_err(|e| format!("scoring task: {e}"))?
        .map_err(|e| e.to_string());
        self.metrics
            .scoring_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn publish(&self, entity: &str, scoring: &Scoring, warm: Warm) {
        let Warm {
            event_time,
            event_id,
            guard,
        } = warm;
        let p = Prediction {
            event_id,
            entity_id: entity.to_string(),
            score: scoring.score,
            label: Some(scoring.label.clone()),
            model_name: scoring.model.spec.name.clone(),
            model_version: scoring.model.spec.version.clone(),
            lane: Lane::Realtime,
            event_time,
            ingested_at: None,
            scored_at: now_millis(),
            batch_id: None,
        };
        // Warming the cache is best effort: the answer does not wait for it.
        let result = async {
            let bytes = self
                .codec
                .encode(&self.predictions_topic, &p)
                .await
                .map_err(|e| e.to_string())?;
            let mut record = FutureRecord::to(&self.predictions_topic)
                .key(entity)
                .payload(&bytes);
            if guard {
                record = record.headers(OwnedHeaders::new().insert(Header {
                    key: cache::HEADER_GUARD,
                    value: Some("1"),
                }));
            }
            let d = enqueue(&self.producer, record)
                .await
                .map_err(|e| e.to_string())?;
            delivered(d).await.map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(entity, error = %e, "real-time prediction not published");
        }
    }
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let cfg = s.fallback_responder.clone();
    let metrics = Metrics::new(&ctx.metrics, &cfg)?;
    kafka::ensure_topics(
        &s.kafka,
        &[
            &s.topics.requests,
            &s.topics.responses,
            &s.topics.predictions,
            &s.topics.dlq,
        ],
    )
    .await
    .context("creating topics")?;
    let model_metrics = ModelMetrics::new(&ctx.metrics, "lanes_fallback_responder")?;
    let (model, model_error) = match lifecycle::serve(&s.model, model_metrics, ctx.shutdown.clone())
        .await
    {
        Ok(m) => (Some(m), None),
        Err(e) => {
            tracing::error!(error = %e, "model unavailable; misses will be answered with ERROR");
            (None, Some(e.to_string()))
        }
    };
    let redis_client = cache::client(&s.redis).context("redis")?;
    let io = stage::io(&ctx, SERVICE, metrics.dead_letters.clone())?;
    let core = Arc::new(Core {
        breaker: Mutex::new(Breaker::new(
            cfg.breaker_failures,
            Duration::from_millis(cfg.breaker_open_ms),
        )),
        cfg: cfg.clone(),
        model,
        model_error,
        redis_client,
        redis: tokio::sync::Mutex::new(None),
        redis_url: lanes_common::config::redact_url_password(&s.redis.url),
        prefix: s.cache_writer.key_prefix.clone(),
        codec: io.codec.clone(),
        producer: io.producer.clone(),
        predictions_topic: s.topics.predictions.clone(),
        responses_topic: s.topics.responses.clone(),
        reply_topics: Arc::new(answer::ReplyTopics::new(s)),
        responses_delivered: answer::LastDelivery::default(),
        reply_listing: replies::Listing::new(Duration::from_secs(1)),
        flights: SingleFlight::default(),
        background: Arc::new(AtomicUsize::new(0)),
        slots: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        rollout: Mutex::new(Rollout::new(tokio::time::Instant::now())),
        metrics,
        stop: ctx.shutdown.clone(),
    });
    let background = sweep::spawn(core.clone(), ctx.shutdown.clone());
    let mut plan = Plan::new(&ctx, SERVICE, &cfg.group, &[&s.topics.requests]);
    // Requests are read ahead of the slots (up to runner.max_in_flight) and wait for one
    // in memory, where each can be expired on time. Every request already fetched is
    // started before any is driven, so a burst for one entity meets in one scoring.
    plan.max_batch = cfg.max_in_flight.max(1);
    // A request's headers (a correlation id) are copied onto its response.
    plan.headers = RecordHeaders::Keep;
    tracing::info!(requests = %s.topics.requests, "fallback-responder running");
    let result = stage::run(&ctx, plan, Responder(core), io).await;
    background.await.ok();
    tracing::info!("fallback-responder stopped");
    result
}

struct Responder(Arc<Core>);

impl Stage for Responder {
    type Input = PredictionRequest;

    async fn handle(
        &mut self,
        inputs: Vec<Input<PredictionRequest>>,
        out: &mut Out<'_>,
    ) -> anyhow::Result<()> {
        for Input { message, record } in inputs {
            let core = self.0.clone();
            let headers = message.headers().cloned();
            out.done_when(vec![message], async move {
                answer::respond(&core, record, headers).await
            });
        }
        Ok(())
    }

    fn busy(&self) -> usize {
        self.0.background.load(Ordering::Relaxed)
    }
}

/// The model's input row from `features`: each of the model's features (`wanted`, in
/// its order), present and in range.
fn model_row(wanted: &[String], features: &BTreeMap<String, f64>) -> Result<Vec<f32>, String> {
    wanted
        .iter()
        .map(|name| match features.get(name) {
            Some(v) => lanes_common::records::model_value(name, *v),
            None => Err(format!("feature {name:?} is missing")),
        })
        .collect()
}
