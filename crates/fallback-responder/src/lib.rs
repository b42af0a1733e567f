//! `lanes-fallback-responder`: answers each `PredictionRequest` from `lanes.requests` on
//! its `reply_topic` (else `lanes.responses`), keyed by request id, with the request's
//! headers copied for correlation.
//!
//! One Redis read (`HGETALL` of the entity's hash: prediction and online features)
//! decides the path ([`decide`]): a fresh cached prediction is served (CACHE); a stale or
//! missing one is scored in-process with the scorer's model code from the request's or
//! the online features (REALTIME) and published to `lanes.predictions` so the cache
//! warms; with nothing to score, NOT_FOUND. Scoring that misses its deadline serves the
//! stale entry (STALE_CACHE) or an ERROR, per `on_deadline`. Concurrent misses for one
//! entity share one scoring ([`coalesce`]). Redis trouble trips a circuit breaker
//! ([`breaker`]) and requests are still answered by real-time scoring; a missing model
//! gives ERROR responses with the reason. Staleness is measured at every read and by a
//! periodic sampler, and old entries are refreshed on read and by a sweep ([`sweep`]).

pub mod breaker;
pub mod coalesce;
pub mod decide;
mod metrics;
pub mod sweep;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use lanes_common::avro::{AvroCodec, DecodeError};
use lanes_common::config::{FallbackResponderConfig, OnDeadline};
use lanes_common::dlq::DlqWriter;
use lanes_common::kafka::{self, delivered, enqueue};
use lanes_common::lifecycle::{self, ModelMetrics, ModelWatch};
use lanes_common::model::Model;
use lanes_common::records::{
    Lane, Prediction, PredictionRequest, PredictionResponse, ResponseSource, ResponseStatus,
    now_millis,
};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::source::{Acks, Source, SourceEvent};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::aio::ConnectionManager;

use crate::breaker::Breaker;
use crate::coalesce::SingleFlight;
use crate::decide::{Cached, Decision, Policy, Stale};
use crate::metrics::Metrics;

pub const SERVICE: &str = "fallback-responder";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.fallback_responder,
        needs_redis: true,
        run: |ctx| Box::pin(run(ctx)),
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
    producer: FutureProducer,
    predictions_topic: String,
    responses_topic: String,
    flights: SingleFlight<Scored>,
    pub metrics: Metrics,
    stop: tokio_util::sync::CancellationToken,
}

impl Core {
    pub fn policy(&self) -> Policy {
        Policy {
            freshness_ms: self.cfg.freshness_ms,
            refresh_after_ms: self.cfg.refresh_after_ms,
            model_version: self.model_version(),
        }
    }

    /// The version being served now, if a model is loaded.
    pub fn model_version(&self) -> Option<String> {
        self.model
            .as_ref()
            .map(|m| m.current().spec.version.clone())
    }

    /// The entity's hash in one round trip, through the circuit breaker. `Err` when the
    /// cache could not be asked.
    pub async fn read(&self, entity: &str) -> Result<Option<Cached>, String> {
        let allowed = self
            .breaker
            .lock()
            .expect("breaker")
            .allow(tokio::time::Instant::now());
        if !allowed {
            return Err("cache circuit open".into());
        }
        let mut conn = match self.connection().await {
            Ok(c) => c,
            Err(e) => {
                let mut breaker = self.breaker.lock().expect("breaker");
                return Err(self.cache_failed(&mut breaker, e));
            }
        };
        let key = format!("{}{entity}", self.prefix);
        let read = tokio::time::timeout(
            Duration::from_millis(self.cfg.redis_timeout_ms),
            redis::cmd("HGETALL")
                .arg(&key)
                .query_async::<HashMap<String, String>>(&mut conn),
        )
        .await;
        let mut breaker = self.breaker.lock().expect("breaker");
        match read {
            Ok(Ok(h)) => {
                breaker.success();
                self.metrics
                    .breaker_state
                    .set(breaker.state(tokio::time::Instant::now()).gauge());
                Ok(Cached::from_hash(&h))
            }
            Ok(Err(e)) => Err(self.cache_failed(&mut breaker, e.to_string())),
            Err(_) => Err(self.cache_failed(
                &mut breaker,
                format!("no answer within {} ms", self.cfg.redis_timeout_ms),
            )),
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

    fn cache_failed(&self, breaker: &mut Breaker, reason: String) -> String {
        let now = tokio::time::Instant::now();
        self.metrics.redis_errors.inc();
        if breaker.failure(now) {
            tracing::warn!(%reason, "cache circuit opened; answering by real-time scoring");
        }
        self.metrics.breaker_state.set(breaker.state(now).gauge());
        reason
    }

    /// Scores `features` for `entity` once however many ask at the same time, and
    /// publishes the result as a REALTIME prediction so the cache warms.
    pub fn score(
        &self,
        core: &Arc<Core>,
        entity: &str,
        features: &BTreeMap<String, f64>,
        event_time: i64,
        event_id: String,
    ) -> coalesce::Flight<Scored> {
        let key = format!(
            "{entity}\u{1f}{}",
            serde_json::to_string(features).unwrap_or_default()
        );
        let (core, entity, features) = (core.clone(), entity.to_string(), features.clone());
        let (flight, started) = self.flights.join(&key, move || async move {
            let scored = core.score_now(&features).await;
            if let Ok(scoring) = scored.clone() {
                // Warming the cache must not delay the answer.
                tokio::spawn(
                    async move { core.publish(&entity, &scoring, event_time, event_id).await },
                );
            }
            scored
        });
        if started {
            self.metrics.scorings.inc();
        }
        flight
    }

    async fn score_now(&self, features: &BTreeMap<String, f64>) -> Scored {
        let Some(model) = self.model.as_ref().map(ModelWatch::current) else {
            return Err(format!(
                "model unavailable: {}",
                self.model_error.as_deref().unwrap_or("not loaded")
            ));
        };
        let wanted = &model.spec.features;
        let mut row = Vec::with_capacity(wanted.len());
        for name in wanted {
            match features.get(name) {
                Some(v) if v.is_finite() => row.push(*v as f32),
                Some(_) => return Err(format!("feature {name:?} is not finite")),
                None => return Err(format!("feature {name:?} is missing")),
            }
        }
        if let Some(extra) = features.keys().find(|k| !wanted.contains(k)) {
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

    async fn publish(&self, entity: &str, scoring: &Scoring, event_time: i64, event_id: String) {
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
            let record = FutureRecord::to(&self.predictions_topic)
                .key(entity)
                .payload(&bytes);
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
    let metrics = Metrics::new(&ctx.metrics)?;
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
    let redis_client = redis::Client::open(s.redis.url.as_str()).context("redis.url")?;
    let producer = kafka::producer(&s.kafka, "lanes-fallback-responder")?;
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
        codec: AvroCodec::new(&s.registry)?,
        producer: producer.clone(),
        predictions_topic: s.topics.predictions.clone(),
        responses_topic: s.topics.responses.clone(),
        flights: SingleFlight::default(),
        metrics,
        stop: ctx.shutdown.clone(),
    });
    let dlq = DlqWriter::new(producer, &s.topics.dlq, SERVICE)
        .with_counter(core.metrics.dead_letters.clone());
    let background = sweep::spawn(core.clone(), ctx.shutdown.clone());
    let mut source = Source::start(
        &s.kafka,
        SERVICE,
        &cfg.group,
        &[&s.topics.requests],
        s.shutdown.drain_timeout(),
        Some(ctx.lag.clone()),
    )?;
    let mut acks = Acks::new();
    let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
    ctx.ready.set(true);
    tracing::info!(requests = %s.topics.requests, "fallback-responder running");
    loop {
        let room = acks.in_flight() < cfg.max_in_flight.max(1);
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(result) = acks.next() => result.map_err(anyhow::Error::msg).context("response not acknowledged")?,
            event = source.events.recv(), if room => {
                // Start every request already fetched before driving any, so a burst for
                // one entity meets in one scoring.
                let mut next = event;
                while let Some(event) = next.take() {
                    match event {
                        SourceEvent::Message(m) => {
                            acks.track(&m);
                            let bytes = m.payload().unwrap_or_default();
                            match core.codec.decode_retrying::<PredictionRequest>(bytes, &ctx.shutdown).await {
                                Ok(d) => {
                                    let offsets = vec![(m.topic().to_string(), m.partition(), m.offset())];
                                    let core = core.clone();
                                    acks.wait_for(offsets, async move { respond(&core, d.record, &m).await });
                                }
                                Err(DecodeError::Poison { class, message }) => acks.dead_letter(&dlq, m, class, message),
                                Err(e) => return Err(anyhow::Error::new(e).context("stopping with an undecoded request")),
                            }
                        }
                        SourceEvent::Assigned(_) => {}
                        SourceEvent::Revoked { partitions, done } => {
                            acks.release(&source.consumer, &partitions, done).await?;
                        }
                    }
                    if acks.in_flight() < cfg.max_in_flight.max(1) {
                        next = source.events.try_recv().ok();
                    }
                }
                if source.events.is_closed() && source.events.is_empty() {
                    break;
                }
            }
            _ = commit_tick.tick() => acks.commit(&source.consumer).await?,
        }
    }
    ctx.ready.set(false);
    acks.finish(source).await?;
    background.await.ok();
    tracing::info!("fallback-responder stopped");
    Ok(())
}

fn response(
    req: &PredictionRequest,
    status: ResponseStatus,
    source: ResponseSource,
) -> PredictionResponse {
    PredictionResponse {
        request_id: req.request_id.clone(),
        entity_id: req.entity_id.clone(),
        status,
        score: None,
        model_version: None,
        source,
        cache_age_ms: None,
        error: None,
        responded_at: 0,
    }
}

fn stale_response(req: &PredictionRequest, s: &Stale) -> PredictionResponse {
    PredictionResponse {
        score: Some(s.score),
        model_version: s.model_version.clone(),
        cache_age_ms: Some(s.age_ms),
        ..response(req, ResponseStatus::Ok, ResponseSource::StaleCache)
    }
}

fn error_response(req: &PredictionRequest, error: String) -> PredictionResponse {
    PredictionResponse {
        error: Some(error),
        ..response(req, ResponseStatus::Error, ResponseSource::None)
    }
}

/// Works out the answer to one request.
pub async fn answer(core: &Arc<Core>, req: &PredictionRequest) -> PredictionResponse {
    let now = now_millis();
    let (cached, cache_error) = match core.read(&req.entity_id).await {
        Ok(c) => (c, None),
        Err(e) => (None, Some(e)),
    };
    let m = &core.metrics;
    let decision = decide::decide(req, cached.as_ref(), &core.policy(), now);
    match &decision {
        Decision::Fresh { age_ms, .. } => {
            m.outcome("fresh_hit");
            m.cache_age.observe(*age_ms as f64 / 1000.0);
        }
        Decision::Score { stale: Some(s), .. } | Decision::StaleOnly(s) => {
            m.outcome("stale_hit");
            m.cache_age.observe(s.age_ms as f64 / 1000.0);
        }
        Decision::Score { stale: None, .. } | Decision::NotFound if cache_error.is_none() => {
            m.outcome("miss")
        }
        _ => {}
    }
    match decision {
        Decision::Fresh {
            score,
            model_version,
            age_ms,
            refresh,
        } => {
            if refresh
                && let Some(c) = &cached
                && let Some(f) = &c.features
            {
                m.refreshes.with_label_values(&["read"]).inc();
                let event_time = c.features_event_time.unwrap_or(now);
                drop(core.score(
                    core,
                    &req.entity_id,
                    f,
                    event_time,
                    refresh_event_id(&req.entity_id, event_time),
                ));
            }
            PredictionResponse {
                score: Some(score),
                model_version,
                cache_age_ms: Some(age_ms),
                ..response(req, ResponseStatus::Ok, ResponseSource::Cache)
            }
        }
        Decision::Score {
            features,
            event_time,
            from_request,
            stale,
        } => {
            m.outcome("realtime");
            let event_id = if from_request {
                req.request_id.clone()
            } else {
                refresh_event_id(&req.entity_id, event_time)
            };
            let deadline = Duration::from_millis(core.cfg.realtime_deadline_ms);
            // A zero deadline is cache-only: nothing is scored, every miss falls back.
            let scored = if deadline.is_zero() {
                None
            } else {
                let flight = core.score(core, &req.entity_id, &features, event_time, event_id);
                tokio::time::timeout(deadline, flight).await.ok()
            };
            match scored {
                Some(Ok(scoring)) => PredictionResponse {
                    score: Some(scoring.score),
                    model_version: Some(scoring.model.spec.version.clone()),
                    ..response(req, ResponseStatus::Ok, ResponseSource::Realtime)
                },
                Some(Err(e)) => {
                    m.outcome("error");
                    error_response(req, format!("real-time scoring failed: {e}"))
                }
                None => {
                    m.deadline_misses.inc();
                    match (core.cfg.on_deadline, stale) {
                        (OnDeadline::Stale, Some(s)) => {
                            m.outcome("stale_served");
                            stale_response(req, &s)
                        }
                        _ => {
                            m.outcome("error");
                            error_response(
                                req,
                                format!(
                                    "real-time scoring missed its {} ms deadline",
                                    deadline.as_millis()
                                ),
                            )
                        }
                    }
                }
            }
        }
        Decision::StaleOnly(s) => {
            m.outcome("stale_served");
            stale_response(req, &s)
        }
        Decision::NotFound => match cache_error {
            Some(e) => {
                m.outcome("error");
                error_response(
                    req,
                    format!("cache unavailable ({e}) and the request carries no features"),
                )
            }
            None => {
                m.outcome("not_found");
                response(req, ResponseStatus::NotFound, ResponseSource::None)
            }
        },
    }
}

/// A re-score from online features is identified by entity, the features' event time
/// and when it was asked for: the cache drops a prediction it already holds (same id,
/// same version), and a later refresh of the same features must still land.
fn refresh_event_id(entity: &str, event_time: i64) -> String {
    format!("refresh-{entity}-{event_time}-{}", now_millis())
}

/// Answers one request and waits for the response's acknowledgement.
async fn respond(core: &Arc<Core>, req: PredictionRequest, m: &OwnedMessage) -> Result<(), String> {
    let started = Instant::now();
    let mut resp = answer(core, &req).await;
    resp.responded_at = now_millis();
    let status = format!("{:?}", resp.status).to_uppercase();
    let source = match resp.source {
        ResponseSource::Cache => "CACHE",
        ResponseSource::Realtime => "REALTIME",
        ResponseSource::StaleCache => "STALE_CACHE",
        ResponseSource::None => "NONE",
    };
    core.metrics
        .responses
        .with_label_values(&[source, &status])
        .inc();
    let topic = req
        .reply_topic
        .clone()
        .unwrap_or_else(|| core.responses_topic.clone());
    let bytes = core
        .codec
        .encode_retrying(&topic, &resp, &core.stop)
        .await
        .map_err(|e| e.to_string())?;
    let mut record = FutureRecord::to(&topic)
        .key(req.request_id.as_str())
        .payload(&bytes);
    if let Some(h) = m.headers() {
        record = record.headers(h.clone());
    }
    let d = enqueue(&core.producer, record)
        .await
        .map_err(|e| e.to_string())?;
    core.metrics
        .response_seconds
        .observe(started.elapsed().as_secs_f64());
    delivered(d).await.map(|_| ()).map_err(|e| e.to_string())
}
