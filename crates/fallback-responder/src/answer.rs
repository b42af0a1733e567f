//! Answering one request: check what the client sent, decide from the cache
//! ([`decide`]), score in real time if needed, and publish the response on its reply
//! topic. A reply topic that refuses the response gets an ERROR on the default topic
//! instead; nothing a client sends can stop the service.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanes_common::avro::EncodeError;
use lanes_common::config::OnDeadline;
use lanes_common::dlq::ErrorClass;
use lanes_common::error::Failure;
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::records::{
    MAX_REQUEST_ID_BYTES, PredictionRequest, PredictionResponse, ResponseSource, ResponseStatus,
    check_client_time, check_ids, now_millis, over_limit,
};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureRecord, Producer as _};
use tokio::sync::OwnedSemaphorePermit;

use crate::decide::{self, Decision, Stale};
use crate::replies::{Listed, REFUSED_FOR};
use crate::{Core, Warm};

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

/// Which topics may receive responses: the configured responses topic, or a name
/// matching `reply_topics` (exact, or a prefix ending in `*`) that Kafka would accept as
/// a topic and that is none of Lanes' other topics nor one of Kafka's own (`__...`).
#[derive(Debug, Clone)]
pub struct ReplyTopics {
    pub default: String,
    pub allowed: Vec<String>,
    /// Lanes' topics other than `default`: a response there would feed a service or
    /// take a subject its records need, whatever `reply_topics` allows.
    pub reserved: Vec<String>,
}

impl ReplyTopics {
    pub fn new(s: &lanes_common::Settings) -> Self {
        let default = s.topics.responses.clone();
        Self {
            reserved: s
                .topics
                .all()
                .into_iter()
                .filter(|t| *t != default)
                .map(str::to_string)
                .collect(),
            allowed: s.fallback_responder.reply_topics.clone(),
            default,
        }
    }

    /// Whether `topic` may receive responses; else why not, quoting at most the first
    /// 100 characters of the name.
    pub fn check(&self, topic: &str) -> Result<(), String> {
        if topic == self.default {
            return Ok(());
        }
        let quoted = || match topic.char_indices().nth(100) {
            Some((end, _)) => format!("{:?}... ({} bytes)", &topic[..end], topic.len()),
            None => format!("{topic:?}"),
        };
        let listed = self
            .allowed
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix) && topic.len() > prefix.len(),
                None => topic == pattern,
            });
        if !listed || topic.starts_with("__") || self.reserved.iter().any(|t| t == topic) {
            return Err(format!("reply_topic {} is not allowed", quoted()));
        }
        // What a prefix lets a client add would otherwise become a registry subject.
        lanes_common::kafka::check_topic_name(topic)
            .map_err(|e| format!("reply_topic {} is not a valid topic name: {e}", quoted()))
    }
}

/// Why a request is refused before any work: no entity, ids over their limits (the
/// cache takes no longer entity id, and the request id names the prediction its features
/// warm), or its own times.
fn refusal(core: &Core, req: &PredictionRequest, now: i64) -> Option<(&'static str, String)> {
    let cfg = &core.cfg;
    if let Err((_, e)) = check_ids(&req.entity_id, "") {
        return Some(("entity_id", e));
    }
    if let Some(e) = over_limit([("request_id", req.request_id.as_str(), MAX_REQUEST_ID_BYTES)]) {
        return Some(("request_id", e));
    }
    if let Err(e) = check_client_time("requested_at", req.requested_at, now, cfg.max_clock_skew_ms)
    {
        return Some(("requested_at", e));
    }
    if let Some(e) = req
        .features
        .as_ref()
        .and_then(|f| core.too_many_features(f))
    {
        return Some(("features", e));
    }
    let age = now - req.requested_at;
    if cfg.max_request_age_ms > 0 && age > cfg.max_request_age_ms as i64 {
        return Some((
            "expired",
            format!(
                "expired: requested {age} ms ago, past max_request_age_ms ({})",
                cfg.max_request_age_ms
            ),
        ));
    }
    None
}

/// The ERROR answer to a request refused for its own times, counted.
fn refused(core: &Core, req: &PredictionRequest, now: i64) -> Option<PredictionResponse> {
    let (reason, error) = refusal(core, req, now)?;
    core.metrics.refused.with_label_values(&[reason]).inc();
    core.metrics.outcome("error");
    Some(error_response(req, error))
}

/// Works out the answer to one request, holding `slot` (or passing it on to the
/// scoring it starts).
pub async fn answer(
    core: &Arc<Core>,
    req: &PredictionRequest,
    slot: OwnedSemaphorePermit,
) -> PredictionResponse {
    let now = now_millis();
    let m = &core.metrics;
    if let Some(refused) = refused(core, req, now) {
        return refused;
    }
    let (cached, cache_error) = match core.read(&req.entity_id).await {
        Ok(c) => (c, None),
        Err(e) => (None, Some(e)),
    };
    let policy = core.policy();
    let decision = decide::decide(req, cached.as_ref(), &policy, now);
    match &decision {
        Decision::Fresh {
            age_ms,
            model_version,
            ..
        } => {
            m.outcome("fresh_hit");
            m.lookup("fresh");
            if model_version.is_some() && *model_version == policy.previous_version {
                m.grace_answers.inc();
            }
            m.cache_age.observe(*age_ms as f64 / 1000.0);
        }
        Decision::Score { stale: Some(s), .. } | Decision::StaleOnly(s) => {
            m.outcome("stale_hit");
            m.lookup(s.cause.label());
            m.cache_age.observe(s.age_ms as f64 / 1000.0);
        }
        Decision::Score { stale: None, .. } | Decision::NotFound if cache_error.is_none() => {
            m.outcome("miss");
            m.lookup("miss");
        }
        _ => m.lookup("unavailable"),
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
                let event_time = c.features_event_time.unwrap_or(now);
                let warm = Warm {
                    event_time,
                    event_id: refresh_event_id(&req.entity_id, event_time),
                    guard: false,
                };
                refresh_in_background(core, &req.entity_id, f, warm, "read");
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
            warm,
            stale,
        } => {
            let warm = warm.then(|| Warm {
                event_time,
                event_id: if from_request {
                    format!("request-{}", req.request_id)
                } else {
                    refresh_event_id(&req.entity_id, event_time)
                },
                guard: from_request,
            });
            // Cached features the serving model cannot take (one left out, written past
            // ingest's checks or before a deployment changed the features) are as good
            // as none: the stale entry is the answer, as with no features at all.
            if !from_request
                && let Some(s) = &stale
                && !core.scorable(&features)
            {
                m.outcome("stale_served");
                return stale_response(req, s);
            }
            if let Some(s) = &stale
                && req
                    .stale_while_refresh
                    .unwrap_or(core.cfg.stale_while_refresh)
            {
                // Only an entry the service itself finds stale is worth re-scoring.
                if let Some(warm) = warm {
                    refresh_in_background(core, &req.entity_id, &features, warm, "stale");
                }
                m.outcome("stale_served");
                return stale_response(req, s);
            }
            m.outcome("realtime");
            let deadline = Duration::from_millis(core.cfg.realtime_deadline_ms);
            // A zero deadline is cache-only: nothing is scored, every miss falls back.
            let scored = if deadline.is_zero() {
                None
            } else {
                let flight = core.score(core, &req.entity_id, &features, from_request, warm, slot);
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

/// Re-scores `features` for `entity` into the cache without anyone waiting, if there is
/// room under `max_in_flight`; coalesced with other scorings of the same entity and
/// features. Counted under `trigger`, or `skipped` when there is no room.
fn refresh_in_background(
    core: &Arc<Core>,
    entity: &str,
    features: &std::collections::BTreeMap<String, f64>,
    warm: Warm,
    trigger: &str,
) {
    let refreshes = &core.metrics.refreshes;
    match core.try_slot() {
        Some(slot) => {
            refreshes.with_label_values(&[trigger]).inc();
            // `guard` marks a request's own features.
            let from_request = warm.guard;
            drop(core.score(core, entity, features, from_request, Some(warm), slot));
        }
        None => refreshes.with_label_values(&["skipped"]).inc(),
    }
}

/// A re-score from online features is identified by entity, the features' event time
/// and when it was asked for: the cache drops a prediction it already holds (same id,
/// same version), and a later refresh of the same features must still land.
pub fn refresh_event_id(entity: &str, event_time: i64) -> String {
    format!(
        "refresh-{entity}-{event_time}-{}",
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether `event_id` is a [`refresh_event_id`] of `entity`: exactly the entity, then
/// the event time and the uuid (an entity id may itself hold dashes).
pub fn is_refresh_of(event_id: &str, entity: &str) -> bool {
    let Some(rest) = event_id
        .strip_prefix("refresh-")
        .and_then(|rest| rest.strip_prefix(entity))
        .and_then(|rest| rest.strip_prefix('-'))
    else {
        return false;
    };
    match rest.split_once('-') {
        Some((time, uuid)) => {
            !time.is_empty()
                && time.bytes().all(|b| b.is_ascii_digit())
                && uuid.len() == 32
                && uuid.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Answers one request and waits for the response's acknowledgement. A reply topic off
/// the allow-list, or one the broker refuses for good, gets an ERROR response on the
/// default topic instead.
pub async fn respond(
    core: &Arc<Core>,
    req: PredictionRequest,
    headers: Option<OwnedHeaders>,
) -> Result<(), Failure> {
    let started = Instant::now();
    let topic = req
        .reply_topic
        .clone()
        .unwrap_or_else(|| core.responses_topic.clone());
    let refused_reply = match core.reply_topics.check(&topic) {
        Err(e) => Some(e),
        Ok(()) if topic != core.responses_topic => Box::pin(admit_reply(core, &topic)).await.err(),
        Ok(()) => None,
    };
    let mut resp = if refused_reply.is_none() {
        // A request refused for its own times gets that reason, not a wait for a slot.
        let refusal = refused(core, &req, now_millis());
        match refusal {
            Some(refused) => refused,
            None => match core.slot(&req).await {
                // Boxed: requests read ahead wait here by the thousand, and each would
                // otherwise carry the whole answer's state while it waits.
                Some(slot) => Box::pin(answer(core, &req, slot)).await,
                None => {
                    core.metrics.refused.with_label_values(&["no_slot"]).inc();
                    core.metrics.outcome("error");
                    error_response(
                        &req,
                        format!(
                            "expired: no free slot within max_request_age_ms ({}) of requested_at",
                            core.cfg.max_request_age_ms
                        ),
                    )
                }
            },
        }
    } else {
        core.metrics
            .refused
            .with_label_values(&["reply_topic"])
            .inc();
        core.metrics.outcome("error");
        let e = error_response(&req, refused_reply.unwrap_or_default());
        return Box::pin(send(core, &core.responses_topic, e, headers, started)).await;
    };
    resp.responded_at = now_millis();
    match Box::pin(send(core, &topic, resp.clone(), headers.clone(), started)).await {
        Err(Failure::Poison { class, message }) if topic != core.responses_topic => {
            // A response too large is this request's own (an id or headers near the
            // limit, or a topic with a lower one): the topic stays open to others. Its
            // error response, carrying the same id, may be too large as well; then the
            // request is dead-lettered TOO_LARGE.
            if class != ErrorClass::TooLarge {
                core.reply_listing
                    .refused(&topic, tokio::time::Instant::now());
                // Registered again (one call) if it is taken again.
                core.codec.forget_id::<PredictionResponse>(&topic);
                core.metrics
                    .refused
                    .with_label_values(&["reply_topic"])
                    .inc();
            }
            tracing::warn!(reply_topic = %topic, error = %message, "reply topic refused the response");
            let e = error_response(
                &req,
                format!("reply_topic {topic:?} refused the response: {message}"),
            );
            Box::pin(send(core, &core.responses_topic, e, headers, started)).await
        }
        other => other,
    }
}

/// Whether a response may go to `topic`, a reply topic other than the default: only if
/// the broker lists it (a response must never make a topic) and it has not refused one
/// lately.
async fn admit_reply(core: &Core, topic: &str) -> Result<(), String> {
    let asked = tokio::time::Instant::now();
    match core
        .reply_listing
        .has(topic, asked, || listed_reply_topics(core))
        .await
    {
        Listed::Yes => Ok(()),
        Listed::No => Err(format!("reply_topic {topic:?} does not exist")),
        Listed::Refused => Err(format!(
            "reply_topic {topic:?} refused a response within the last {}s",
            REFUSED_FOR.as_secs()
        )),
        Listed::Unknown => Err(format!(
            "reply_topic {topic:?} could not be looked up: the broker's topics could not be listed"
        )),
    }
}

/// The broker's topics that requests may name as reply topics, or `None` when it could
/// not be asked.
async fn listed_reply_topics(core: &Core) -> Option<HashSet<String>> {
    let producer = core.producer.clone();
    let rule = core.reply_topics.clone();
    let listed = tokio::task::spawn_blocking(move || {
        producer
            .inner()
            .client()
            .fetch_metadata(None, LISTING_TIMEOUT)
            .map(|md| {
                md.topics()
                    .iter()
                    .map(|t| t.name())
                    .filter(|t| rule.check(t).is_ok())
                    .map(str::to_string)
                    .collect::<HashSet<_>>()
            })
    })
    .await;
    match listed {
        Ok(Ok(topics)) => {
            // Ids of reply topics no longer on the broker go, so reply topics that come
            // and go do not pile up.
            core.codec.forget_topics(|t| {
                t != core.responses_topic
                    && core.reply_topics.check(t).is_ok()
                    && !topics.contains(t)
            });
            Some(topics)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not list the broker's topics for reply topics");
            None
        }
        Err(_) => None,
    }
}

/// How long a listing of the broker's topics may take.
const LISTING_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the registry is retried for a reply topic's subject before its request is
/// answered on the default topic instead: a subject a client picked can be refused for
/// good in ways that read as passing (a 403 from rights per subject).
const REPLY_REGISTRY_PATIENCE: Duration = Duration::from_secs(10);

/// How long a response to a reply topic other than the default may wait for its
/// delivery, while other responses are delivered, before its request is answered on
/// the default topic instead.
const REPLY_DELIVERY_PATIENCE: Duration = Duration::from_secs(10);

async fn send(
    core: &Core,
    topic: &str,
    mut resp: PredictionResponse,
    headers: Option<OwnedHeaders>,
    started: Instant,
) -> Result<(), Failure> {
    if resp.responded_at == 0 {
        resp.responded_at = now_millis();
    }
    core.metrics
        .responses
        .with_label_values(&[resp.source.as_str(), resp.status.as_str()])
        .inc();
    // A refused schema concerns this reply topic only (its subject holds another
    // schema): poison, so the request is answered on the default topic instead.
    let encoding = lanes_common::retry::retrying("schema registry", &core.stop, || {
        core.codec.encode(topic, &resp)
    });
    let encoded = if topic == core.responses_topic {
        encoding.await
    } else {
        tokio::time::timeout(REPLY_REGISTRY_PATIENCE, encoding)
            .await
            .unwrap_or_else(|_| {
                Err(EncodeError {
                    retriable: false,
                    message: format!(
                        "the registry did not take subject {topic}-value within {REPLY_REGISTRY_PATIENCE:?}"
                    ),
                })
            })
    };
    let bytes = encoded.map_err(|e| match e.retriable {
        true => Failure::transient(e.message),
        false => Failure::poison(ErrorClass::ProduceError, e.message),
    })?;
    let mut record = FutureRecord::to(topic)
        .key(resp.request_id.as_str())
        .payload(&bytes);
    if let Some(h) = headers {
        record = record.headers(h);
    }
    let d = enqueue(&core.producer, record)
        .await
        .map_err(|e| Failure::from_produce(&e))?;
    core.metrics
        .response_seconds
        .observe(started.elapsed().as_secs_f64());
    let delivery = delivered(d);
    let result = if topic == core.responses_topic {
        delivery.await
    } else {
        // Producers never give up on a delivery; a reply topic a client picked must not
        // hold its request (and the offsets behind it) while it has no leader. Only
        // while other responses are delivered is that this topic's fault: in an
        // outage every response waits for the broker alike.
        let enqueued = Instant::now();
        tokio::pin!(delivery);
        loop {
            match tokio::time::timeout(REPLY_DELIVERY_PATIENCE, &mut delivery).await {
                Ok(result) => break result,
                Err(_) if core.responses_delivered.since(enqueued) => {
                    return Err(Failure::poison(
                        ErrorClass::ProduceError,
                        format!(
                            "not delivered to {topic} within {REPLY_DELIVERY_PATIENCE:?}, while other responses are"
                        ),
                    ));
                }
                Err(_) => {}
            }
        }
    };
    if result.is_ok() {
        core.responses_delivered.mark();
    }
    result.map_err(|e| Failure::from_produce(&e))?;
    Ok(())
}

/// When a response was last delivered, to any topic: whether the broker takes responses
/// at all, so a reply topic that takes none can be told from an outage.
#[derive(Debug, Default)]
pub struct LastDelivery(std::sync::Mutex<Option<Instant>>);

impl LastDelivery {
    fn mark(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn since(&self, t: Instant) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at >= t)
    }
}

#[cfg(test)]
mod tests {

    /// The size of the future `f` returns, without running it.
    fn future_size<'a, F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'a Arc<Core>, PredictionRequest, Option<OwnedHeaders>) -> Fut,
        Fut: std::future::Future,
    {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn a_request_waiting_for_a_slot_holds_little_memory() {
        // Thousands of read-ahead requests wait for a slot at once; the answer's own
        // state is allocated only when its slot is free.
        let size = future_size(respond);
        eprintln!("respond future: {size} bytes");
        assert!(size < 1024, "{size} bytes");
    }
    use super::*;

    #[test]
    fn a_refresh_id_names_its_entity_and_no_other() {
        let id = refresh_event_id("card-4", 17);
        assert!(is_refresh_of(&id, "card-4"));
        assert!(
            !is_refresh_of(&id, "card"),
            "a prefix of the entity is another entity"
        );
        assert!(!is_refresh_of(&id, "card-42"));
        assert!(!is_refresh_of("card-4-17", "card-4"));
    }

    #[test]
    fn reply_topics_are_allowed_by_name_or_prefix_and_must_be_topic_names() {
        let mut s = lanes_common::Settings::load_from(None, Default::default()).unwrap();
        s.fallback_responder.reply_topics = vec![
            "lanes.responses.*".to_string(),
            "team-a.answers".to_string(),
        ];
        let rule = ReplyTopics::new(&s);
        let check = |t: &str| rule.check(t);
        assert_eq!(check("lanes.responses"), Ok(()));
        assert_eq!(check("lanes.responses.team-b"), Ok(()));
        assert_eq!(check("team-a.answers"), Ok(()));
        let refused = |t: &str| check(t).expect_err(t);
        assert!(
            refused("lanes.responses.").contains("not allowed"),
            "the prefix alone is no topic"
        );
        assert!(refused("lanes.predictions").contains("not allowed"));
        assert!(refused("lanes.dlq").contains("not allowed"));
        assert!(refused("team-a.answers.x").contains("not allowed"));
        assert!(refused("__consumer_offsets").contains("not allowed"));
        // Allowing any topic still keeps Lanes' own and Kafka's.
        s.fallback_responder.reply_topics = vec!["*".to_string()];
        let any = ReplyTopics::new(&s);
        assert_eq!(any.check("team-b"), Ok(()));
        assert_eq!(any.check("lanes.responses"), Ok(()));
        for t in [
            "lanes.dlq",
            "lanes.events.raw",
            "lanes.predictions.shadow",
            "__consumer_offsets",
        ] {
            assert!(any.check(t).expect_err(t).contains("not allowed"), "{t}");
        }
        // A prefix does not let a client walk the registry's URL.
        let e = refused("lanes.responses.x/../../lanes.events");
        assert!(
            e.contains("not a valid topic name") && e.contains("'/'"),
            "{e}"
        );
        assert!(refused("lanes.responses.x?y").contains("'?'"));
        let long = format!("lanes.responses.{}", "x".repeat(300));
        let e = refused(&long);
        assert!(
            e.contains("316 characters") && e.contains("(316 bytes)"),
            "{e}"
        );
        assert!(e.len() < 250, "a hostile name is not echoed whole: {e}");
    }
}
