//! `lanes-ingest`: raw JSON events from `lanes.events.raw` become validated Avro
//! `Event`s on `lanes.events`, keyed by entity id.
//!
//! Each record is validated against the model's feature list ([`validate`]); a record
//! that fails goes to the dead-letter topic with its class. An input offset is committed
//! only after its `Event` (or its dead letter) is acknowledged by the broker.

pub mod validate;

use std::time::Duration;

use anyhow::Context;
use lanes_common::avro::AvroCodec;
use lanes_common::dlq::DlqWriter;
use lanes_common::kafka::{self, delivered, enqueue};
use lanes_common::model::ModelSpec;
use lanes_common::records::now_millis;
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::source::{Acks, Source, SourceEvent};
use prometheus::{IntCounterVec, Opts, Registry};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::validate::{Origin, Rules};

pub const SERVICE: &str = "ingest";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.ingest,
        needs_redis: false,
        run: |ctx| Box::pin(run(ctx)),
    }
}

struct Metrics {
    events: IntCounterVec,
    dead_letters: IntCounterVec,
}

impl Metrics {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "lanes_ingest_events_total",
                "Raw events read, by outcome (valid, dead_letter).",
            ),
            &["outcome"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "lanes_ingest_dead_letters_total",
                "Raw events dead-lettered, by error class.",
            ),
            &["class"],
        )?;
        lanes_common::metrics::zeroed(&events, &["valid", "dead_letter"]);
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        Ok(Self {
            events,
            dead_letters,
        })
    }
}

struct Ingest {
    rules: Rules,
    codec: AvroCodec,
    producer: FutureProducer,
    dlq: DlqWriter,
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
    let producer = kafka::producer(&s.kafka, "lanes-ingest")?;
    let ingest = Ingest {
        rules: Rules {
            features: spec.features,
            max_bytes: s.ingest.max_event_bytes,
            default_kind: s.ingest.default_kind.clone(),
        },
        codec: AvroCodec::new(&s.registry)?,
        dlq: DlqWriter::new(producer.clone(), &s.topics.dlq, SERVICE)
            .with_counter(metrics.dead_letters.clone()),
        producer,
        events_topic: s.topics.events.clone(),
        metrics,
    };
    let mut source = Source::start(
        &s.kafka,
        SERVICE,
        &s.ingest.group,
        &[&s.topics.raw],
        s.shutdown.drain_timeout(),
        Some(ctx.lag.clone()),
    )?;
    let mut acks = Acks::new();
    let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
    ctx.ready.set(true);
    tracing::info!(from = %s.topics.raw, to = %s.topics.events, "ingest running");
    loop {
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(result) = acks.next() => result.map_err(anyhow::Error::msg).context("output not acknowledged")?,
            event = source.events.recv() => match event {
                None => break,
                Some(SourceEvent::Message(m)) => {
                    acks.track(&m);
                    ingest.handle(m, &mut acks, &ctx).await?;
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
    tracing::info!("ingest stopped");
    Ok(())
}

impl Ingest {
    async fn handle(
        &self,
        m: OwnedMessage,
        acks: &mut Acks,
        ctx: &ServiceContext,
    ) -> anyhow::Result<()> {
        let origin = Origin {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
        };
        let offsets = vec![(m.topic().to_string(), m.partition(), m.offset())];
        match validate::validate(
            m.payload().unwrap_or_default(),
            &self.rules,
            &origin,
            now_millis(),
        ) {
            Ok(event) => {
                let bytes = self
                    .codec
                    .encode_retrying(&self.events_topic, &event, &ctx.shutdown)
                    .await?;
                let record = FutureRecord::to(&self.events_topic)
                    .key(event.entity_id.as_str())
                    .payload(&bytes);
                let delivery = enqueue(&self.producer, record).await?;
                self.metrics.events.with_label_values(&["valid"]).inc();
                acks.wait_for(offsets, async move {
                    delivered(delivery)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            }
            Err((class, message)) => {
                self.metrics
                    .events
                    .with_label_values(&["dead_letter"])
                    .inc();
                acks.dead_letter(&self.dlq, m, class, message);
            }
        }
        Ok(())
    }
}
