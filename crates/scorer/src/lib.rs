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
//! to the shadow topic, which the cache never reads. The shadow runs in background tasks
//! (at most [`SHADOW_IN_FLIGHT`] batches; past that a batch is skipped and counted), so
//! its failures and deliveries never hold up, slow or fail the served predictions.
//!
//! A batch is checked before anything indexes it: columns of different lengths are
//! DECODE_ERROR, feature names other than the model's are MODEL_ERROR.

mod metrics;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use lanes_common::dlq::ErrorClass;
use lanes_common::error::Failure;
use lanes_common::kafka::{self, delivered, enqueue};
use lanes_common::lifecycle::{self, ModelMetrics, ModelWatch};
use lanes_common::model::{Model, ModelError};
use lanes_common::records::{Lane, MicroBatch, Prediction, now_millis};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::stage::{self, Input, Io, Out, Plan, Stage};
use prometheus::IntCounterVec;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureRecord;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

pub const SERVICE: &str = "scorer";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.scorer,
        needs_redis: false,
        inputs: |s| vec![(s.scorer.group.clone(), s.topics.batches.clone())],
        group: |s| &mut s.scorer.group,
        run: |ctx| Box::pin(run(ctx)),
    }
}

/// The batch-size label: rows rounded up to a power of two.
pub fn size_bucket(rows: usize) -> String {
    rows.max(1).next_power_of_two().to_string()
}

struct Scorer {
    model: ModelWatch,
    shadow: Option<Shadow>,
    predictions_topic: String,
    metrics: Metrics,
}

/// The candidate model, scored beside the served one off its path: its work runs in
/// background tasks, at most [`SHADOW_IN_FLIGHT`] batches at once, and a batch that
/// finds no room is skipped and counted rather than waited for.
struct Shadow {
    model: Arc<Model>,
    topic: String,
    io: Io,
    room: Arc<Semaphore>,
    rows: IntCounterVec,
}

const SHADOW_IN_FLIGHT: usize = 64;

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
    let shadow_model = load_shadow(&s.model, &model, &metrics).await;
    let mut topics = vec![&s.topics.batches, &s.topics.predictions, &s.topics.dlq];
    if shadow_model.is_some() {
        topics.push(&s.topics.shadow_predictions);
    }
    let topics: Vec<&str> = topics.into_iter().map(String::as_str).collect();
    kafka::ensure_topics(&s.kafka, &topics)
        .await
        .context("creating topics")?;
    let io = stage::io(&ctx, SERVICE, metrics.dead_letters.clone())?;
    let serving = model.current();
    tracing::info!(model = %serving.spec.name, version = %serving.spec.version, "scorer running");
    drop(serving);
    let scorer = Scorer {
        model,
        shadow: shadow_model.map(|m| Shadow {
            model: m,
            topic: s.topics.shadow_predictions.clone(),
            io: io.clone(),
            room: Arc::new(Semaphore::new(SHADOW_IN_FLIGHT)),
            rows: metrics.shadow_rows.clone(),
        }),
        predictions_topic: s.topics.predictions.clone(),
        metrics,
    };
    let plan = Plan::new(&ctx, SERVICE, &s.scorer.group, &[&s.topics.batches]);
    stage::run(&ctx, plan, scorer, io).await
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

impl Stage for Scorer {
    type Input = MicroBatch;

    async fn handle(
        &mut self,
        inputs: Vec<Input<MicroBatch>>,
        out: &mut Out<'_>,
    ) -> anyhow::Result<()> {
        for input in inputs {
            self.score_batch(input, out).await?;
        }
        Ok(())
    }

    fn rejected(&mut self, _class: ErrorClass) {
        self.metrics
            .batches
            .with_label_values(&["dead_letter"])
            .inc();
    }
}

impl Scorer {
    fn dead_letter(&self, m: OwnedMessage, class: ErrorClass, message: String, out: &mut Out<'_>) {
        self.metrics
            .batches
            .with_label_values(&["dead_letter"])
            .inc();
        out.dead_letter(m, class, message);
    }

    async fn score_batch(&self, input: Input<MicroBatch>, out: &mut Out<'_>) -> anyhow::Result<()> {
        let Input {
            message: m,
            record: mut batch,
        } = input;
        let rows = match batch.rows() {
            Ok(rows) => rows,
            Err(e) => {
                self.dead_letter(
                    m,
                    ErrorClass::DecodeError,
                    format!("malformed batch: {e}"),
                    out,
                );
                return Ok(());
            }
        };
        // One version scores the whole batch, whatever is swapped in meanwhile.
        let model = self.model.current();
        if batch.feature_names != model.spec.features {
            let message = format!(
                "batch columns {:?} are not the model's {:?}",
                batch.feature_names, model.spec.features
            );
            self.dead_letter(m, ErrorClass::ModelError, message, out);
            return Ok(());
        }
        // The micro-batcher leaves such rows out; another writer's batch may not, and a
        // tree ensemble scores NaN as a branch taken, so its output alone cannot tell.
        if let Some(at) = batch.features.iter().position(|v| !v.is_finite()) {
            let width = batch.feature_names.len();
            let message = format!(
                "feature {:?} of row {} is {}, not a finite number",
                batch.feature_names[at % width],
                at / width,
                batch.features[at]
            );
            self.dead_letter(m, ErrorClass::NonFinite, message, out);
            return Ok(());
        }
        let started = Instant::now();
        let features = Arc::new(std::mem::take(&mut batch.features));
        // ONNX Runtime blocks; keep it off the async workers.
        let scored = tokio::task::spawn_blocking({
            let (model, features) = (model.clone(), features.clone());
            move || score(&model, &features, rows)
        })
        .await?;
        let scored = match scored {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(batch = %batch.batch_id, error = %e, "model rejected a batch");
                self.dead_letter(m, ErrorClass::ModelError, e.to_string(), out);
                return Ok(());
            }
        };
        self.metrics
            .inference
            .with_label_values(&[&size_bucket(rows)])
            .observe(started.elapsed().as_secs_f64());
        self.metrics.rows.inc_by(rows as u64);
        self.metrics.batches.with_label_values(&["scored"]).inc();
        let batch = Arc::new(batch);
        for p in predictions(&batch, &model, scored) {
            let bytes = out.encode(&self.predictions_topic, &p).await?;
            let record = FutureRecord::to(&self.predictions_topic)
                .key(p.entity_id.as_str())
                .payload(&bytes);
            match out.produce(record).await {
                Ok(()) => {}
                Err(Failure::Poison { class, message }) => {
                    // Deliveries already enqueued may land; the batch is replayable from
                    // the dead letter and predictions are idempotent in the cache.
                    out.abandon_outputs();
                    self.dead_letter(m, class, message, out);
                    return Ok(());
                }
                Err(e) => return Err(e).context("producing a prediction"),
            }
        }
        out.done_when_delivered(vec![m]);
        if let Some(shadow) = &self.shadow {
            shadow.spawn(batch, features, rows);
        }
        Ok(())
    }
}

/// One prediction per row of `batch`, scored by `model`.
fn predictions(batch: &MicroBatch, model: &Model, (scores, labels): Scores) -> Vec<Prediction> {
    let scored_at = now_millis();
    scores
        .into_iter()
        .zip(labels)
        .enumerate()
        .map(|(i, (score, label))| Prediction {
            event_id: batch.event_ids[i].clone(),
            entity_id: batch.entity_ids[i].clone(),
            score,
            label: Some(label),
            model_name: model.spec.name.clone(),
            model_version: model.spec.version.clone(),
            lane: Lane::Stream,
            event_time: batch.event_times[i],
            ingested_at: Some(batch.ingested_ats[i]),
            scored_at,
            batch_id: Some(batch.batch_id.clone()),
        })
        .collect()
}

impl Shadow {
    /// Scores and publishes `batch` with the candidate in the background; never waited
    /// for, never failing the served predictions.
    fn spawn(&self, batch: Arc<MicroBatch>, features: Arc<Vec<f32>>, rows: usize) {
        let Ok(permit) = self.room.clone().try_acquire_owned() else {
            self.rows
                .with_label_values(&["skipped"])
                .inc_by(rows as u64);
            return;
        };
        let (model, topic, io, counter) = (
            self.model.clone(),
            self.topic.clone(),
            self.io.clone(),
            self.rows.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let outcome = shadow_publish(&model, &topic, &io, &batch, &features, rows).await;
            let label = match &outcome {
                Ok(()) => "scored",
                Err(e) => {
                    tracing::warn!(batch = %batch.batch_id, error = %e, "shadow model failed a batch");
                    "failed"
                }
            };
            counter.with_label_values(&[label]).inc_by(rows as u64);
        });
    }
}

async fn shadow_publish(
    model: &Arc<Model>,
    topic: &str,
    io: &Io,
    batch: &MicroBatch,
    features: &Arc<Vec<f32>>,
    rows: usize,
) -> Result<(), String> {
    let scored = tokio::task::spawn_blocking({
        let (model, features) = (model.clone(), features.clone());
        move || score(&model, &features, rows)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let mut deliveries = Vec::with_capacity(rows);
    for p in predictions(batch, model, scored) {
        let bytes = io
            .codec
            .encode(topic, &p)
            .await
            .map_err(|e| e.to_string())?;
        let record = FutureRecord::to(topic)
            .key(p.entity_id.as_str())
            .payload(&bytes);
        deliveries.push(
            enqueue(&io.producer, record)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    for d in deliveries {
        delivered(d).await.map_err(|e| e.to_string())?;
    }
    Ok(())
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
