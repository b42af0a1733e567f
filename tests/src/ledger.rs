//! The fault suite's ledger: a load driver that publishes paced raw events with
//! deterministic ids and records how each send ended, and a checker that reads
//! `lanes.predictions`, `lanes.dlq` and Redis back and counts every event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lanes_common::avro::AvroCodec;
use lanes_common::generator::Generator;
use lanes_common::records::{Event, MicroBatch, Prediction, now_millis};
use lanes_fallback_responder::answer::is_refresh_of;
use rdkafka::Message;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{Lane, client_producer, consumer};

/// How a send ended, as the producer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sent {
    /// Acknowledged by the broker: it must come out as a prediction or a dead letter.
    Ok,
    /// Refused before it could reach the log: it must not come out.
    Failed,
    /// Timed out in flight: it may or may not be in the log.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Send {
    pub id: String,
    pub entity: String,
    pub event_time: i64,
    /// When it was handed to the producer, in ms since the Unix epoch.
    pub at_ms: i64,
    pub status: Sent,
}

/// Every send of one run.
#[derive(Debug, Default)]
pub struct Ledger {
    pub sends: Vec<Send>,
}

impl Ledger {
    pub fn acknowledged(&self) -> impl Iterator<Item = &Send> {
        self.sends.iter().filter(|s| s.status == Sent::Ok)
    }
}

/// Publishes events at a fixed rate until stopped. Event `n` of run `run` has id
/// `{run}-{n}` and entity `{run}-e{n % entities}`; event times rise with `n`, so an
/// entity's newest event is its highest `n`.
pub struct Driver {
    stop: CancellationToken,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Ledger>,
}

impl Driver {
    pub fn start(lane: &Lane, run: &str, rate: u32, entities: usize) -> Self {
        let stop = CancellationToken::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(drive(
            lane.clone(),
            run.to_string(),
            rate,
            entities,
            stop.clone(),
            sent.clone(),
        ));
        Self { stop, sent, task }
    }

    /// Events handed to the producer so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops sending, waits for every outstanding acknowledgement, returns the ledger.
    pub async fn finish(self) -> Ledger {
        self.stop.cancel();
        self.task.await.expect("load driver")
    }
}

async fn drive(
    lane: Lane,
    run: String,
    rate: u32,
    entities: usize,
    stop: CancellationToken,
    sent: Arc<AtomicUsize>,
) -> Ledger {
    let producer = client_producer(&lane.settings);
    let topic = lane.settings.topics.raw.clone();
    let mut features = Generator::new(7, entities.max(1));
    let mut ledger = Ledger::default();
    let mut pending: FuturesUnordered<futures::future::BoxFuture<'static, (usize, Sent)>> =
        FuturesUnordered::new();
    let started = Instant::now();
    let base_time = now_millis();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some((i, status)) = pending.next() => ledger.sends[i].status = status,
            _ = tick.tick() => {
                let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as usize;
                while ledger.sends.len() < due {
                    let n = ledger.sends.len();
                    let mut s = features.next_sample();
                    s.event_id = format!("{run}-{n}");
                    s.entity_id = format!("{run}-e{}", n % entities);
                    // Rising with n, and never in the future for ingest's skew check.
                    s.event_time = base_time + (n as f64 * 1000.0 / f64::from(rate)) as i64;
                    let line = s.raw_json();
                    let record = FutureRecord::to(&topic).key(&s.entity_id).payload(&line);
                    let status = match producer.send_result(record) {
                        Ok(delivery) => {
                            pending.push(Box::pin(async move {
                                let status = match delivery.await {
                                    Ok(Ok(_)) => Sent::Ok,
                                    Ok(Err((e, _))) => classify(&e),
                                    Err(_) => Sent::Unknown,
                                };
                                (n, status)
                            }));
                            Sent::Unknown
                        }
                        Err((e, _)) => classify(&e),
                    };
                    ledger.sends.push(Send {
                        id: s.event_id,
                        entity: s.entity_id,
                        event_time: s.event_time,
                        at_ms: now_millis(),
                        status,
                    });
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    while let Some((i, status)) = pending.next().await {
        ledger.sends[i].status = status;
    }
    ledger
}

/// A refusal before the broker had the record is a failure; a timeout is unknown.
fn classify(e: &KafkaError) -> Sent {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure,
        ) => Sent::Unknown,
        _ => Sent::Failed,
    }
}

/// What the checker found, as the suite reports it.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub sent: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub unknown: usize,
    /// Acknowledged sends with neither a prediction nor a dead letter.
    pub lost: usize,
    /// Predictions or dead letters for ids never sent.
    pub phantom: usize,
    /// Predictions beyond the first per id.
    pub duplicates: usize,
    /// Duplicates by the second their events were sent (ms since the Unix epoch, to the
    /// second): which fault replayed them.
    pub duplicates_by_send_s: BTreeMap<i64, usize>,
    /// Predictions or cache entries under another entity than their event's.
    pub misrouted: usize,
    /// Entities whose cache entry is not their newest acknowledged event.
    pub cache_gap: usize,
    pub dead_letters: usize,
    /// From the end of the fault until the lane's committed lag was back to normal.
    pub recovery_s: Option<f64>,
    /// Peak resident memory (VmHWM) of each process, in MiB.
    pub peak_rss_mib: BTreeMap<String, f64>,
    /// Example ids behind non-zero counts, for the failure message.
    pub examples: BTreeMap<String, Vec<String>>,
}

impl Report {
    /// Asserts the pass rule: nothing lost, invented or misrouted, the cache on every
    /// entity's newest event, duplicates within `max_duplicates`, memory within
    /// `rss_budget_mib` per process.
    pub fn assert_passes(&self, max_duplicates: usize, rss_budget_mib: f64) {
        let json = serde_json::to_string_pretty(self).expect("report serializes");
        assert!(self.acknowledged > 0, "nothing was acknowledged: {json}");
        assert_eq!(self.lost, 0, "lost events: {json}");
        assert_eq!(self.phantom, 0, "phantom outputs: {json}");
        assert_eq!(self.misrouted, 0, "misrouted outputs: {json}");
        assert_eq!(self.cache_gap, 0, "cache behind the stream: {json}");
        assert!(
            self.duplicates <= max_duplicates,
            "{} duplicates, more than the {max_duplicates} allowed: {json}",
            self.duplicates
        );
        for (name, mib) in &self.peak_rss_mib {
            assert!(
                *mib <= rss_budget_mib,
                "{name} peaked at {mib:.0} MiB, over {rss_budget_mib} MiB: {json}"
            );
        }
    }

    /// Prints the report as one JSON line, for the README table and CI logs.
    pub fn print(&self) {
        eprintln!(
            "fault-report {}",
            serde_json::to_string(self).expect("report serializes")
        );
    }
}

/// Reads the lane's outputs until every acknowledged send is accounted for (or
/// `timeout`), then for `quiet` more to catch late duplicates, then checks Redis until
/// the cache holds each entity's newest event (or `timeout`). `requests` are the
/// ids of requests sent meanwhile: the responder publishes a prediction
/// `request-<id>` for each it scores from the request's features.
pub async fn check(
    lane: &Lane,
    ledger: &Ledger,
    requests: &[String],
    timeout: Duration,
    quiet: Duration,
) -> Report {
    let s = &lane.settings;
    let by_id: HashMap<&str, &Send> = ledger.sends.iter().map(|x| (x.id.as_str(), x)).collect();
    let scored_requests: HashSet<String> =
        requests.iter().map(|r| format!("request-{r}")).collect();
    let must: HashSet<&str> = ledger.acknowledged().map(|x| x.id.as_str()).collect();
    let mut report = Report {
        sent: ledger.sends.len(),
        acknowledged: must.len(),
        failed: count(ledger, Sent::Failed),
        unknown: count(ledger, Sent::Unknown),
        ..Report::default()
    };
    let codec = AvroCodec::new(&s.registry).expect("codec");
    let consumer = consumer(s, &[&s.topics.predictions, &s.topics.dlq]);
    let mut predictions: HashMap<String, usize> = HashMap::new();
    let mut lettered: HashSet<String> = HashSet::new();
    let mut misrouted = Vec::new();
    let mut phantom = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet_until: Option<tokio::time::Instant> = None;
    loop {
        let accounted = must
            .iter()
            .all(|id| predictions.contains_key(*id) || lettered.contains(*id));
        if accounted && quiet_until.is_none() {
            quiet_until = Some(tokio::time::Instant::now() + quiet);
        }
        let until = quiet_until.unwrap_or(deadline).min(deadline);
        let m = match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(m) => m.expect("consume outputs").detach(),
            Err(_) => break,
        };
        let Some(bytes) = m.payload() else { continue };
        if m.topic() == s.topics.dlq {
            for id in dead_lettered_ids(&codec, bytes).await {
                if !by_id.contains_key(id.as_str()) {
                    phantom.push(id.clone());
                }
                lettered.insert(id);
            }
            continue;
        }
        let p = codec
            .decode::<Prediction>(bytes)
            .await
            .expect("predictions decode")
            .record;
        if scored_requests.contains(&p.event_id) {
            continue;
        }
        // The responder re-scoring an entity from its online features (a stale entry,
        // or a refresh) publishes `refresh-<entity>-...`: no event of the ledger, but
        // it must be the entity's own.
        if p.event_id.starts_with("refresh-") {
            if !is_refresh_of(&p.event_id, &p.entity_id) || m.key() != Some(p.entity_id.as_bytes())
            {
                misrouted.push(p.event_id.clone());
            }
            continue;
        }
        match by_id.get(p.event_id.as_str()) {
            None => phantom.push(p.event_id.clone()),
            Some(send) => {
                if p.entity_id != send.entity || m.key() != Some(send.entity.as_bytes()) {
                    misrouted.push(p.event_id.clone());
                }
            }
        }
        *predictions.entry(p.event_id).or_default() += 1;
    }
    let lost: Vec<String> = must
        .iter()
        .filter(|id| !predictions.contains_key(**id) && !lettered.contains(**id))
        .map(|id| id.to_string())
        .collect();
    report.lost = lost.len();
    report.duplicates = predictions.values().map(|n| n - 1).sum();
    for (id, n) in predictions.iter().filter(|(_, n)| **n > 1) {
        if let Some(send) = by_id.get(id.as_str()) {
            *report
                .duplicates_by_send_s
                .entry(send.at_ms / 1000 * 1000)
                .or_default() += n - 1;
        }
    }
    report.dead_letters = lettered.len();

    // The cache: each entity's entry must be its newest acknowledged event (or a newer
    // one whose send timed out), and only ever an event of that entity.
    let mut newest: HashMap<&str, &Send> = HashMap::new();
    for x in ledger.acknowledged() {
        let e = newest.entry(x.entity.as_str()).or_insert(x);
        if x.event_time > e.event_time {
            *e = x;
        }
    }
    let entities: Vec<&str> = ledger
        .sends
        .iter()
        .map(|x| x.entity.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let (gaps, wrong) = loop {
        let hashes = cache_hashes(lane, &entities).await;
        let mut gaps = Vec::new();
        let mut wrong = Vec::new();
        for (entity, h) in entities.iter().zip(&hashes) {
            let id = h.get("event_id").map(String::as_str).unwrap_or_default();
            match by_id.get(id) {
                Some(c) if c.entity != *entity => wrong.push(format!("{entity}: {id}")),
                // A request's own score may be newer than the entity's last event, and
                // a refresh from online features may hold the newest event's time.
                None if !id.is_empty()
                    && !scored_requests.contains(id)
                    && !is_refresh_of(id, entity) =>
                {
                    wrong.push(format!("{entity}: unknown {id}"))
                }
                _ => {}
            }
            if let Some(want) = newest.get(entity) {
                let at = h
                    .get("event_time")
                    .and_then(|t| t.parse::<i64>().ok())
                    .unwrap_or(i64::MIN);
                if at < want.event_time {
                    gaps.push(format!("{entity}: want {}", want.id));
                }
            }
        }
        if (gaps.is_empty() && wrong.is_empty()) || tokio::time::Instant::now() >= deadline {
            break (gaps, wrong);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    report.cache_gap = gaps.len();
    misrouted.extend(wrong);
    report.misrouted = misrouted.len();
    report.phantom = phantom.len();
    if !lost.is_empty() {
        let traced: Vec<String> = lost.iter().take(5).cloned().collect();
        report.examples.insert(
            "lost_trace".to_string(),
            trace(lane, &traced, &predictions).await,
        );
    }
    for (what, ids) in [
        ("lost", lost),
        ("phantom", phantom),
        ("misrouted", misrouted),
        ("cache_gap", gaps),
    ] {
        if !ids.is_empty() {
            report
                .examples
                .insert(what.to_string(), ids.into_iter().take(5).collect());
        }
    }
    report
}

/// Where each of `ids` was last seen on its way through the lane: its raw record, the
/// event ingest made of it, and the micro-batch that carried it (with how many of that
/// batch's events have a prediction), so a loss names the stage that dropped it.
async fn trace(lane: &Lane, ids: &[String], predictions: &HashMap<String, usize>) -> Vec<String> {
    let s = &lane.settings;
    let codec = AvroCodec::new(&s.registry).expect("codec");
    let reader = consumer(s, &[&s.topics.raw, &s.topics.events, &s.topics.batches]);
    let mut seen: HashMap<&str, Vec<String>> = HashMap::new();
    let at = |m: &rdkafka::message::OwnedMessage| format!("{}@{}", m.partition(), m.offset());
    // Until the topics have been quiet a while: the load has stopped by now.
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(5), reader.recv()).await {
        let m = m.expect("consume the lane's topics").detach();
        let Some(bytes) = m.payload() else { continue };
        if m.topic() == s.topics.raw {
            let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
            let id = v
                .get("event_id")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            if let Some(id) = ids.iter().find(|x| *x == id) {
                seen.entry(id).or_default().push(format!("raw {}", at(&m)));
            }
        } else if m.topic() == s.topics.events {
            if let Ok(e) = codec.decode::<Event>(bytes).await
                && let Some(id) = ids.iter().find(|x| **x == e.record.event_id)
            {
                seen.entry(id)
                    .or_default()
                    .push(format!("events {}", at(&m)));
            }
        } else if let Ok(b) = codec.decode::<MicroBatch>(bytes).await {
            let b = b.record;
            for id in ids.iter().filter(|x| b.event_ids.contains(x)) {
                let scored = b
                    .event_ids
                    .iter()
                    .filter(|e| predictions.contains_key(e.as_str()))
                    .count();
                seen.entry(id).or_default().push(format!(
                    "batch {} {} ({scored} of {} scored)",
                    b.batch_id,
                    at(&m),
                    b.event_ids.len()
                ));
            }
        }
    }
    ids.iter()
        .map(|id| match seen.get(id.as_str()) {
            Some(places) => format!("{id}: {}", places.join(", ")),
            None => format!("{id}: nowhere"),
        })
        .collect()
}

fn count(ledger: &Ledger, status: Sent) -> usize {
    ledger.sends.iter().filter(|x| x.status == status).count()
}

/// Event ids a dead letter carries: raw JSON from ingest, or an Avro event, micro-batch
/// or prediction from the stages after it.
async fn dead_lettered_ids(codec: &AvroCodec, bytes: &[u8]) -> Vec<String> {
    let value = if bytes.first() == Some(&0) {
        match codec.decode_json(bytes).await {
            Ok((v, _)) => v,
            Err(_) => return Vec::new(),
        }
    } else {
        serde_json::from_slice(bytes).unwrap_or_default()
    };
    if let Some(id) = value.get("event_id").and_then(|v| v.as_str()) {
        return vec![id.to_string()];
    }
    value
        .get("event_ids")
        .and_then(|v| v.as_array())
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Each entity's cache hash, in order (empty where there is no entry).
pub async fn cache_hashes(lane: &Lane, entities: &[&str]) -> Vec<HashMap<String, String>> {
    let mut conn = crate::redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let mut out = Vec::with_capacity(entities.len());
    for chunk in entities.chunks(500) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.cmd("HGETALL").arg(lanes_common::cache::key(
                &lane.settings.cache_writer.key_prefix,
                e,
            ));
        }
        let hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.expect("HGETALL");
        out.extend(hashes);
    }
    out
}

/// The committed lag of each input (group and topic) of `defs`, in their order; `None`
/// where it is not known (no commit yet, or the broker did not answer).
pub async fn input_lags(
    settings: &lanes_common::Settings,
    defs: &[lanes_common::service::ServiceDef],
) -> Vec<Option<i64>> {
    let inputs: Vec<(String, String)> = defs.iter().flat_map(|d| (d.inputs)(settings)).collect();
    let kafka = settings.kafka.clone();
    tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .map(|(g, t)| lanes_common::kafka::group_lag(&kafka, g, t).ok())
            .collect()
    })
    .await
    .expect("lag task")
}

/// Samples the lane's total committed lag every 200 ms until stopped; answers how long
/// after a moment the lag first came back to its level before the fault.
pub struct LagWatch {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Vec<(Instant, i64)>>,
}

impl LagWatch {
    pub fn start(lane: &Lane, defs: &[lanes_common::service::ServiceDef]) -> Self {
        let (settings, defs) = (lane.settings.clone(), defs.to_vec());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !token.is_cancelled() {
                let lag: i64 = input_lags(&settings, &defs)
                    .await
                    .into_iter()
                    .map(|l| l.unwrap_or(0))
                    .sum();
                samples.push((Instant::now(), lag));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            samples
        });
        Self { stop, task }
    }

    /// Seconds from `fault_end` until the lag first fell back to at most the highest
    /// lag seen in steady state before `fault_start` (never below `floor`).
    pub async fn recovery(
        self,
        fault_start: Instant,
        fault_end: Instant,
        floor: i64,
    ) -> Option<f64> {
        self.stop.cancel();
        let samples = self.task.await.ok()?;
        let normal = samples
            .iter()
            .filter(|(t, _)| *t < fault_start)
            .map(|(_, l)| *l)
            .max()
            .unwrap_or(0)
            .max(floor);
        samples
            .iter()
            .find(|(t, l)| *t >= fault_end && *l <= normal)
            .map(|(t, _)| t.duration_since(fault_end).as_secs_f64())
    }
}

/// Publishes prediction requests at a fixed rate until stopped: request `n` of run
/// `run` has id `{run}-r{n}` and asks for entity `{run}-e{n % entities}` with its
/// features, so each can be answered whether or not the cache has it.
pub struct Requests {
    run: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Vec<(String, Sent, i64)>>,
}

impl Requests {
    /// One request per entity, encoded now and sent at once by the returned closure's
    /// future, so they reach the responder within milliseconds of the call.
    pub async fn burst(lane: &Lane, run: &str, entities: usize) -> impl FnOnce() -> Self + use<> {
        let producer = client_producer(&lane.settings);
        let codec = AvroCodec::new(&lane.settings.registry).expect("codec");
        let topic = lane.settings.topics.requests.clone();
        let mut features = Generator::new(9, entities.max(1));
        let mut encoded = Vec::with_capacity(entities);
        for n in 0..entities {
            let request = lanes_common::records::PredictionRequest {
                request_id: format!("{run}-r{n}"),
                entity_id: format!("{run}-e{n}"),
                features: Some(features.next_sample().feature_map()),
                max_age_ms: None,
                reply_topic: None,
                requested_at: now_millis(),
                stale_while_refresh: None,
            };
            let bytes = codec
                .encode(&topic, &request)
                .await
                .expect("request encodes");
            encoded.push((request, bytes));
        }
        let run = run.to_string();
        move || {
            let stop = CancellationToken::new();
            let deliveries: Vec<_> = encoded
                .into_iter()
                .map(|(request, bytes)| {
                    let record = FutureRecord::to(&topic)
                        .key(&request.entity_id)
                        .payload(&bytes);
                    let delivery = producer.send_result(record).map_err(|(e, _)| classify(&e));
                    (request, delivery)
                })
                .collect();
            let task = tokio::spawn(async move {
                // Dropping the producer would cancel what it has not delivered yet.
                let _producer = producer;
                let mut sent = Vec::new();
                for (request, delivery) in deliveries {
                    let status = match delivery {
                        Ok(d) => match d.await {
                            Ok(Ok(_)) => Sent::Ok,
                            Ok(Err((e, _))) => classify(&e),
                            Err(_) => Sent::Unknown,
                        },
                        Err(status) => status,
                    };
                    sent.push((request.request_id, status, request.requested_at));
                }
                sent
            });
            Self { run, stop, task }
        }
    }

    pub fn start(lane: &Lane, run: &str, rate: u32, entities: usize) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let (lane, id) = (lane.clone(), run.to_string());
        let run = id.clone();
        let task = tokio::spawn(async move {
            let producer = client_producer(&lane.settings);
            let codec = AvroCodec::new(&lane.settings.registry).expect("codec");
            let topic = lane.settings.topics.requests.clone();
            let mut features = Generator::new(8, entities.max(1));
            let mut sent = Vec::new();
            let mut pending = FuturesUnordered::new();
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    Some((i, status)) = pending.next() => {
                        let entry: &mut (String, Sent, i64) = &mut sent[i];
                        entry.1 = status;
                    }
                    _ = tick.tick() => {
                        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as usize;
                        while sent.len() < due {
                            let n = sent.len();
                            let request = lanes_common::records::PredictionRequest {
                                request_id: format!("{run}-r{n}"),
                                entity_id: format!("{run}-e{}", n % entities),
                                features: Some(features.next_sample().feature_map()),
                                max_age_ms: None,
                                reply_topic: None,
                                requested_at: now_millis(),
                                stale_while_refresh: None,
                            };
                            let bytes = codec.encode(&topic, &request).await.expect("request encodes");
                            let record = FutureRecord::to(&topic)
                                .key(&request.entity_id)
                                .payload(&bytes);
                            let status = match producer.send_result(record) {
                                Ok(delivery) => {
                                    pending.push(async move {
                                        let status = match delivery.await {
                                            Ok(Ok(_)) => Sent::Ok,
                                            Ok(Err((e, _))) => classify(&e),
                                            Err(_) => Sent::Unknown,
                                        };
                                        (n, status)
                                    });
                                    Sent::Unknown
                                }
                                Err((e, _)) => classify(&e),
                            };
                            sent.push((request.request_id, status, request.requested_at));
                        }
                    }
                }
            }
            while let Some((i, status)) = pending.next().await {
                sent[i].1 = status;
            }
            sent
        });
        Self {
            run: id,
            stop,
            task,
        }
    }

    /// Stops sending and reads responses until every acknowledged request has one (or
    /// `timeout`).
    pub async fn finish(self, lane: &Lane, timeout: Duration) -> Answers {
        self.stop.cancel();
        let run = self.run;
        let sent = self.task.await.expect("request driver");
        let known: HashMap<&str, i64> = sent.iter().map(|(id, _, at)| (id.as_str(), *at)).collect();
        let mut waiting: HashSet<&str> = sent
            .iter()
            .filter(|(_, s, _)| *s == Sent::Ok)
            .map(|(id, _, _)| id.as_str())
            .collect();
        let acknowledged = waiting.len();
        let codec = AvroCodec::new(&lane.settings.registry).expect("codec");
        let consumer = consumer(&lane.settings, &[&lane.settings.topics.responses]);
        let mut answers = Answers::default();
        let deadline = tokio::time::Instant::now() + timeout;
        while !waiting.is_empty() {
            let Ok(m) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
                break;
            };
            let m = m.expect("consume responses");
            let Some(bytes) = m.payload() else { continue };
            let r = codec
                .decode::<lanes_common::records::PredictionResponse>(bytes)
                .await
                .expect("responses decode")
                .record;
            let Some(requested_at) = known.get(r.request_id.as_str()) else {
                // Other drivers may share the lane's responses topic.
                if r.request_id.starts_with(&format!("{run}-r")) {
                    answers.phantom += 1;
                }
                continue;
            };
            if waiting.remove(r.request_id.as_str()) {
                *answers
                    .sources
                    .entry(format!("{:?}", r.source).to_uppercase())
                    .or_default() += 1;
                *answers
                    .statuses
                    .entry(format!("{:?}", r.status).to_uppercase())
                    .or_default() += 1;
                answers.answered.push(Answered {
                    latency_ms: r.responded_at - requested_at,
                    status: format!("{:?}", r.status).to_uppercase(),
                    error: r.error.clone().unwrap_or_default(),
                });
                if r.status == lanes_common::records::ResponseStatus::Ok {
                    let (lo, hi) = answers
                        .ok_between
                        .get_or_insert((r.responded_at, r.responded_at));
                    *lo = (*lo).min(r.responded_at);
                    *hi = (*hi).max(r.responded_at);
                }
            }
        }
        answers.acknowledged = acknowledged;
        answers.ids = known.keys().map(|id| id.to_string()).collect();
        answers.unanswered = waiting.into_iter().map(str::to_string).collect();
        answers.unanswered.sort();
        answers
    }
}

/// What came back for the requests of a [`Requests`] run.
#[derive(Debug, Default)]
pub struct Answers {
    /// Every request id sent.
    pub ids: Vec<String>,
    pub acknowledged: usize,
    pub unanswered: Vec<String>,
    /// Answers to request ids never sent.
    pub phantom: usize,
    /// First answers by source (CACHE, REALTIME, ...) and by status (OK, ERROR, ...).
    pub sources: BTreeMap<String, usize>,
    pub statuses: BTreeMap<String, usize>,
    /// Each first answer, in arrival order.
    pub answered: Vec<Answered>,
    /// The first and last `responded_at` of OK answers.
    pub ok_between: Option<(i64, i64)>,
}

/// One first answer of a [`Requests`] run.
#[derive(Debug)]
pub struct Answered {
    /// `responded_at - requested_at`.
    pub latency_ms: i64,
    /// OK, ERROR, ...
    pub status: String,
    /// Its error text, "" for none.
    pub error: String,
}

impl Answers {
    pub fn assert_all_answered(&self) {
        assert!(self.acknowledged > 0, "requests were sent: {self:?}");
        assert!(
            self.unanswered.is_empty(),
            "{} of {} requests unanswered: {:?}",
            self.unanswered.len(),
            self.acknowledged,
            &self.unanswered[..self.unanswered.len().min(5)]
        );
        assert_eq!(self.phantom, 0, "answers to requests never sent");
    }
}
