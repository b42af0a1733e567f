//! `lanes-scorer`: each `MicroBatch` from `lanes.batches` is scored by ONNX Runtime as
//! one `[rows, features]` tensor on a blocking thread, and becomes one `Prediction` per
//! event (lane STREAM) on `lanes.predictions`, keyed by entity id.
//!
//! The batch's offset is committed only after every prediction is acknowledged. A batch
//! the model rejects goes to the dead-letter topic as MODEL_ERROR and the scorer goes
//! on. A model whose `model.toml` does not match its graph is refused at start: the
//! scorer logs why, stays not ready, and consumes nothing.
//!
//! New model versions are picked up without a restart ([`lifecycle`]): each batch is
//! scored by the version current when it arrives and its predictions name it. With a
//! shadow version configured, every batch is also scored by the candidate and published
//! to the shadow topic, which the cache never reads; a shadow failure is counted and
//! logged, never allowed to hold up or fail the served predictions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lanes_common::avro::{AvroCodec, DecodeError};
use lanes_common::dlq::{DlqWriter, ErrorClass};
use lanes_common::kafka::{self, delivered, enqueue};
use lanes_common::lifecycle::{self, ModelMetrics, ModelWatch};
use lanes_common::model::{Model, ModelError};
use lanes_common::records::{Lane, MicroBatch, Prediction, now_millis};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::source::{Acks, Source, SourceEvent};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub const SERVICE: &str = "scorer";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.scorer,
        needs_redis: false,
        run: |ctx| Box::pin(run(ctx)),
    }
}

struct Metrics {
    inference: HistogramVec,
    rows: IntCounter,
    batches: IntCounterVec,
    shadow: IntGaugeVec,
    shadow_rows: IntCounterVec,
    dead_letters: IntCounterVec,
}

impl Metrics {
    fn new(r: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            inference: HistogramVec::new(
                HistogramOpts::new(
                    "lanes_scorer_inference_seconds",
                    "ONNX Runtime time per batch, by batch size (rows, rounded up to a power of two).",
                )
                .buckets(prometheus::exponential_buckets(0.000_01, 2.0, 18)?),
                &["batch_size"],
            )?,
            rows: IntCounter::new("lanes_scorer_rows_scored_total", "Rows scored.")?,
            batches: IntCounterVec::new(
                Opts::new("lanes_scorer_batches_total", "Batches read, by outcome (scored, dead_letter)."),
                &["outcome"],
            )?,
            shadow: IntGaugeVec::new(
                Opts::new("lanes_scorer_shadow_model_info", "The shadow model (1) by name and version."),
                &["name", "version"],
            )?,
            shadow_rows: IntCounterVec::new(
                Opts::new("lanes_scorer_shadow_rows_total", "Rows scored by the shadow model, by outcome (scored, failed)."),
                &["outcome"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new("lanes_scorer_dead_letters_total", "Batches dead-lettered, by error class."),
                &["class"],
            )?,
        };
        lanes_common::metrics::zeroed(&m.batches, &["scored", "dead_letter"]);
        lanes_common::metrics::zeroed(&m.shadow_rows, &["scored", "failed"]);
        r.register(Box::new(m.inference.clone()))?;
        r.register(Box::new(m.rows.clone()))?;
        r.register(Box::new(m.batches.clone()))?;
        r.register(Box::new(m.shadow.clone()))?;
        r.register(Box::new(m.shadow_rows.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        Ok(m)
    }
}

/// The batch-size label: rows rounded up to a power of two.
pub fn size_bucket(rows: usize) -> String {
    rows.max(1).next_power_of_two().to_string()
}

struct Scorer {
    model: ModelWatch,
    shadow: Option<Arc<Model>>,
    codec: AvroCodec,
    producer: FutureProducer,
    dlq: DlqWriter,
    predictions_topic: String,
    shadow_topic: String,
    metrics: Metrics,
}

/// One model's scores and labels for a batch.
type Scores = (Vec<f64>, Vec<String>);

fn score(model: &Model, features: &[f32], rows: usize) -> Result<Scores, ModelError> {
    let scores = model.score(features, rows)?;
    let labels = scores.iter().map(|s| model.label(*s).to_string()).collect();
    Ok((scores, labels))
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let metrics = Metrics::new(&ctx.metrics)?;
    let model_metrics = ModelMetrics::new(&ctx.metrics, "lanes_scorer")?;
    let model = match lifecycle::serve(&s.model, model_metrics, ctx.shutdown.clone()).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, dir = %s.model.dir.display(), "model refused; the scorer stays not ready");
            ctx.shutdown.cancelled().await;
            return Ok(());
        }
    };
    let shadow = load_shadow(&s.model, &model, &metrics).await;
    let mut topics = vec![&s.topics.batches, &s.topics.predictions, &s.topics.dlq];
    if shadow.is_some() {
        topics.push(&s.topics.shadow_predictions);
    }
    let topics: Vec<&str> = topics.into_iter().map(String::as_str).collect();
    kafka::ensure_topics(&s.kafka, &topics)
        .await
        .context("creating topics")?;
    let producer = kafka::producer(&s.kafka, "lanes-scorer")?;
    let serving = model.current();
    let scorer = Scorer {
        model,
        shadow,
        codec: AvroCodec::new(&s.registry)?,
        dlq: DlqWriter::new(producer.clone(), &s.topics.dlq, SERVICE)
            .with_counter(metrics.dead_letters.clone()),
        producer,
        predictions_topic: s.topics.predictions.clone(),
        shadow_topic: s.topics.shadow_predictions.clone(),
        metrics,
    };
    let mut source = Source::start(
        &s.kafka,
        SERVICE,
        &s.scorer.group,
        &[&s.topics.batches],
        s.shutdown.drain_timeout(),
        Some(ctx.lag.clone()),
    )?;
    let mut acks = Acks::new();
    let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
    ctx.ready.set(true);
    tracing::info!(model = %serving.spec.name, version = %serving.spec.version, "scorer running");
    drop(serving);
    loop {
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(result) = acks.next() => result.map_err(anyhow::Error::msg).context("predictions not acknowledged")?,
            event = source.events.recv() => match event {
                None => break,
                Some(SourceEvent::Message(m)) => {
                    acks.track(&m);
                    scorer.handle(m, &mut acks, &ctx).await?;
                }
                Some(SourceEvent::Assigned(_)) => {}
                Some(SourceEvent::Revoked { partitions, done }) => {
                    acks.release(&source.consumer, &partitions, done).await?;
                }
            },
            _ = commit_tick.tick() => acks.commit(&source.consumer).await?,
        }
    }
    ctx.ready.set(false);
    acks.finish(source).await?;
    tracing::info!("scorer stopped");
    Ok(())
}

/// The shadow model, if one is configured and may stand beside the served one.
async fn load_shadow(
    cfg: &lanes_common::config::ModelConfig,
    model: &ModelWatch,
    metrics: &Metrics,
) -> Option<Arc<Model>> {
    let dir = cfg.shadow_folder()?;
    let serving = model.current();
    let loaded = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || lifecycle::load_successor(&serving, &dir)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match loaded {
        Ok(m) => {
            metrics
                .shadow
                .with_label_values(&[&m.spec.name, &m.spec.version])
                .set(1);
            tracing::info!(version = %m.spec.version, "shadow model loaded");
            Some(Arc::new(m))
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "shadow model refused; scoring without it");
            None
        }
    }
}

impl Scorer {
    fn dead_letter(&self, m: OwnedMessage, class: ErrorClass, message: String, acks: &mut Acks) {
        self.metrics
            .batches
            .with_label_values(&["dead_letter"])
            .inc();
        acks.dead_letter(&self.dlq, m, class, message);
    }

    async fn handle(
        &self,
        m: OwnedMessage,
        acks: &mut Acks,
        ctx: &ServiceContext,
    ) -> anyhow::Result<()> {
        let bytes = m.payload().unwrap_or_default();
        let mut batch = match self
            .codec
            .decode_retrying::<MicroBatch>(bytes, &ctx.shutdown)
            .await
        {
            Ok(d) => d.record,
            Err(DecodeError::Poison { class, message }) => {
                self.dead_letter(m, class, message, acks);
                return Ok(());
            }
            Err(e) => return Err(anyhow::Error::new(e).context("stopping with an undecoded batch")),
        };
        let rows = batch.event_ids.len();
        // One version scores the whole batch, whatever is swapped in meanwhile.
        let model = self.model.current();
        if batch.feature_names != model.spec.features {
            let message = format!(
                "batch columns {:?} are not the model's {:?}",
                batch.feature_names, model.spec.features
            );
            self.dead_letter(m, ErrorClass::ModelError, message, acks);
            return Ok(());
        }
        let started = Instant::now();
        let features = std::mem::take(&mut batch.features);
        // ONNX Runtime blocks; keep it off the async workers.
        let (scored, shadowed) = tokio::task::spawn_blocking({
            let (model, shadow) = (model.clone(), self.shadow.clone());
            move || {
                let scored = score(&model, &features, rows);
                let shadowed = match (&scored, shadow) {
                    (Ok(_), Some(shadow)) => Some((score(&shadow, &features, rows), shadow)),
                    _ => None,
                };
                (scored, shadowed)
            }
        })
        .await?;
        let (scores, labels) = match scored {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(batch = %batch.batch_id, error = %e, "model rejected a batch");
                self.dead_letter(m, ErrorClass::ModelError, e.to_string(), acks);
                return Ok(());
            }
        };
        self.metrics
            .inference
            .with_label_values(&[&size_bucket(rows)])
            .observe(started.elapsed().as_secs_f64());
        self.metrics.rows.inc_by(rows as u64);
        self.metrics.batches.with_label_values(&["scored"]).inc();
        let mut deliveries = Vec::with_capacity(rows);
        self.publish(
            &batch,
            &model,
            (scores, labels),
            &self.predictions_topic,
            &mut deliveries,
            ctx,
        )
        .await?;
        match shadowed {
            Some((Ok(scored), shadow)) => {
                self.metrics
                    .shadow_rows
                    .with_label_values(&["scored"])
                    .inc_by(rows as u64);
                self.publish(
                    &batch,
                    &shadow,
                    scored,
                    &self.shadow_topic,
                    &mut deliveries,
                    ctx,
                )
                .await?;
            }
            Some((Err(e), _)) => {
                self.metrics
                    .shadow_rows
                    .with_label_values(&["failed"])
                    .inc_by(rows as u64);
                tracing::warn!(batch = %batch.batch_id, error = %e, "shadow model failed a batch");
            }
            None => {}
        }
        let offsets = vec![(m.topic().to_string(), m.partition(), m.offset())];
        acks.wait_for(offsets, async move {
            for d in deliveries {
                delivered(d).await.map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        Ok(())
    }

    /// Enqueues one prediction per row of `batch`, scored by `model`, to `topic`.
    async fn publish(
        &self,
        batch: &MicroBatch,
        model: &Model,
        (scores, labels): Scores,
        topic: &str,
        deliveries: &mut Vec<rdkafka::producer::DeliveryFuture>,
        ctx: &ServiceContext,
    ) -> anyhow::Result<()> {
        let scored_at = now_millis();
        for (i, (score, label)) in scores.into_iter().zip(labels).enumerate() {
            let p = Prediction {
                event_id: batch.event_ids[i].clone(),
                entity_id: batch.entity_ids[i].clone(),
                score,
                label: Some(label),
                model_name: model.spec.name.clone(),
                model_version: model.spec.version.clone(),
                lane: Lane::Stream,
                event_time: batch.event_times[i],
                ingested_at: batch.ingested_ats.get(i).copied(),
                scored_at,
                batch_id: Some(batch.batch_id.clone()),
            };
            let bytes = self.codec.encode_retrying(topic, &p, &ctx.shutdown).await?;
            let record = FutureRecord::to(topic)
                .key(p.entity_id.as_str())
                .payload(&bytes);
            deliveries.push(enqueue(&self.producer, record).await?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_are_labelled_by_power_of_two() {
        assert_eq!(size_bucket(0), "1");
        assert_eq!(size_bucket(1), "1");
        assert_eq!(size_bucket(3), "4");
        assert_eq!(size_bucket(64), "64");
        assert_eq!(size_bucket(65), "128");
    }
}
