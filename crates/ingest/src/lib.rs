//! `lanes-ingest`: raw JSON events from `lanes.events.raw` become validated Avro
//! `Event`s on `lanes.events`, keyed by entity id.
//!
//! Each record is validated against the model's feature list ([`validate`]); a record
//! that fails goes to the dead-letter topic with its class. An input offset is committed
//! only after its `Event` (or its dead letter) is acknowledged by the broker.

mod metrics;
pub mod validate;

use anyhow::Context;
use lanes_common::error::Failure;
use lanes_common::kafka;
use lanes_common::model::ModelSpec;
use lanes_common::records::now_millis;
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::stage::{self, Input, Out, Plan, Raw, Stage};
use rdkafka::Message;
use rdkafka::producer::FutureRecord;

use crate::validate::{Origin, Rules};

use crate::metrics::Metrics;

pub const SERVICE: &str = "ingest";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.ingest,
        needs_redis: false,
        inputs: |s| vec![(s.ingest.group.clone(), s.topics.raw.clone())],
        group: |s| &mut s.ingest.group,
        run: |ctx| Box::pin(run(ctx)),
    }
}

struct Ingest {
    rules: Rules,
    events_topic: String,
    metrics: Metrics,
}

/// Runs until `ctx.shutdown` is cancelled, then drains and commits.
pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let spec = ModelSpec::read(&s.model.resolve()?)?;
    let metrics = Metrics::new(&ctx.metrics)?;
    kafka::ensure_topics(&s.kafka, &[&s.topics.raw, &s.topics.events, &s.topics.dlq])
        .await
        .context("creating topics")?;
    let io = stage::io(&ctx, SERVICE, metrics.dead_letters.clone())?;
    let ingest = Ingest {
        rules: Rules::new(spec.features, &s.ingest),
        events_topic: s.topics.events.clone(),
        metrics,
    };
    let plan = Plan::new(&ctx, SERVICE, &s.ingest.group, &[&s.topics.raw]);
    tracing::info!(from = %s.topics.raw, to = %s.topics.events, "ingest running");
    stage::run(&ctx, plan, ingest, io).await
}

impl Stage for Ingest {
    type Input = Raw;

    async fn handle(&mut self, inputs: Vec<Input<Raw>>, out: &mut Out<'_>) -> anyhow::Result<()> {
        for Input { message: m, .. } in inputs {
            let origin = Origin {
                topic: m.topic(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp: m.timestamp().to_millis(),
            };
            match validate::validate(
                m.payload().unwrap_or_default(),
                &self.rules,
                &origin,
                now_millis(),
            ) {
                Ok(event) => {
                    let bytes = out.encode(&self.events_topic, &event).await?;
                    let record = FutureRecord::to(&self.events_topic)
                        .key(event.entity_id.as_str())
                        .payload(&bytes);
                    match out.produce(record).await {
                        Ok(()) => {
                            self.metrics.events.with_label_values(&["valid"]).inc();
                            out.done_when_delivered(vec![m]);
                        }
                        Err(Failure::Poison { class, message }) => {
                            self.metrics
                                .events
                                .with_label_values(&["dead_letter"])
                                .inc();
                            out.dead_letter(m, class, message);
                        }
                        Err(e) => return Err(e).context("producing an event"),
                    }
                }
                Err((class, message)) => {
                    self.metrics
                        .events
                        .with_label_values(&["dead_letter"])
                        .inc();
                    out.dead_letter(m, class, message);
                }
            }
        }
        Ok(())
    }
}
