//! `lanes-micro-batcher`: Avro `Event`s from `lanes.events` are gathered into one window
//! per assigned partition ([`window`]); a closed window becomes one `MicroBatch` on
//! `lanes.batches`, keyed by its source partition, in columns ready to be one tensor.
//!
//! A window's input offsets are committed only after its batch is acknowledged. When a
//! partition is revoked, and at shutdown, open windows are flushed, their batches
//! acknowledged and their offsets committed before the partition is let go.

pub mod window;

use std::time::Duration;

use anyhow::Context;
use lanes_common::avro::{AvroCodec, DecodeError};
use lanes_common::dlq::DlqWriter;
use lanes_common::kafka::{self, delivered, enqueue};
use lanes_common::model::ModelSpec;
use lanes_common::records::{Event, now_millis};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::source::{Acks, Source, SourceEvent};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::time::Instant;

use crate::window::{Closed, WindowConfig, Windows};

pub const SERVICE: &str = "micro-batcher";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.micro_batcher,
        needs_redis: false,
        run: |ctx| Box::pin(run(ctx)),
    }
}

struct Metrics {
    events: IntCounterVec,
    batch_size: Histogram,
    batch_bytes: Histogram,
    closed: IntCounterVec,
    open_seconds: Histogram,
    dead_letters: IntCounterVec,
}

impl Metrics {
    fn new(r: &Registry) -> anyhow::Result<Self> {
        let m = Self {
            events: IntCounterVec::new(
                Opts::new(
                    "lanes_micro_batcher_events_total",
                    "Events read, by outcome (batched, dead_letter).",
                ),
                &["outcome"],
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_micro_batcher_batch_size_events",
                    "Events per emitted batch.",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                ]),
            )?,
            batch_bytes: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_micro_batcher_batch_size_bytes",
                    "Encoded size of emitted batches.",
                )
                .buckets(prometheus::exponential_buckets(256.0, 4.0, 8)?),
            )?,
            closed: IntCounterVec::new(
                Opts::new(
                    "lanes_micro_batcher_windows_closed_total",
                    "Windows closed, by reason (COUNT, BYTES, DELAY, FLUSH, PRIORITY).",
                ),
                &["reason"],
            )?,
            open_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "lanes_micro_batcher_window_open_seconds",
                    "How long a window stayed open.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "lanes_micro_batcher_dead_letters_total",
                    "Events dead-lettered, by error class.",
                ),
                &["class"],
            )?,
        };
        lanes_common::metrics::zeroed(&m.events, &["batched", "dead_letter"]);
        lanes_common::metrics::zeroed(&m.closed, &["COUNT", "BYTES", "DELAY", "FLUSH", "PRIORITY"]);
        r.register(Box::new(m.events.clone()))?;
        r.register(Box::new(m.batch_size.clone()))?;
        r.register(Box::new(m.batch_bytes.clone()))?;
        r.register(Box::new(m.closed.clone()))?;
        r.register(Box::new(m.open_seconds.clone()))?;
        r.register(Box::new(m.dead_letters.clone()))?;
        Ok(m)
    }
}

struct Batcher {
    codec: AvroCodec,
    producer: FutureProducer,
    dlq: DlqWriter,
    events_topic: String,
    batches_topic: String,
    metrics: Metrics,
}

pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let s = &ctx.settings;
    let spec = ModelSpec::read(&s.model.resolve()?)?;
    let metrics = Metrics::new(&ctx.metrics)?;
    kafka::ensure_topics(
        &s.kafka,
        &[&s.topics.events, &s.topics.batches, &s.topics.dlq],
    )
    .await
    .context("creating topics")?;
    let producer = kafka::producer(&s.kafka, "lanes-micro-batcher")?;
    let b = Batcher {
        codec: AvroCodec::new(&s.registry)?,
        dlq: DlqWriter::new(producer.clone(), &s.topics.dlq, SERVICE)
            .with_counter(metrics.dead_letters.clone()),
        producer,
        events_topic: s.topics.events.clone(),
        batches_topic: s.topics.batches.clone(),
        metrics,
    };
    let cfg = &s.micro_batcher;
    let mut windows = Windows::new(
        WindowConfig {
            max_events: cfg.max_events,
            max_bytes: cfg.max_bytes,
            max_delay: Duration::from_millis(cfg.max_delay_ms),
            priority_kinds: cfg.priority_kinds.clone(),
            features: spec.features.clone(),
        },
        &s.topics.events,
    );
    let mut source = Source::start(
        &s.kafka,
        SERVICE,
        &cfg.group,
        &[&s.topics.events],
        s.shutdown.drain_timeout(),
        Some(ctx.lag.clone()),
    )?;
    let mut acks = Acks::new();
    let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
    ctx.ready.set(true);
    tracing::info!(
        max_events = cfg.max_events,
        max_bytes = cfg.max_bytes,
        max_delay_ms = cfg.max_delay_ms,
        "micro-batcher running"
    );
    loop {
        let deadline = windows.next_deadline();
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            Some(result) = acks.next() => result.map_err(anyhow::Error::msg).context("batch not acknowledged")?,
            _ = sleep_until(deadline) => {
                for closed in windows.expire(Instant::now(), now_millis()) {
                    b.emit(closed, &mut acks, &ctx).await?;
                }
            }
            event = source.events.recv() => match event {
                None => break,
                Some(SourceEvent::Message(m)) => {
                    acks.track(&m);
                    if let Some(event) = b.decode(&m, &mut acks, &ctx).await? {
                        b.metrics.events.with_label_values(&["batched"]).inc();
                        for closed in windows.push(m.partition(), m.offset(), &event, Instant::now(), now_millis()) {
                            b.emit(closed, &mut acks, &ctx).await?;
                        }
                    }
                }
                Some(SourceEvent::Assigned(_)) => {}
                Some(SourceEvent::Revoked { partitions, done }) => {
                    let ids: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
                    for closed in windows.flush(Some(&ids), Instant::now(), now_millis()) {
                        b.emit(closed, &mut acks, &ctx).await?;
                    }
                    acks.release(&source.consumer, &partitions, done).await?;
                }
            },
            _ = commit_tick.tick() => acks.commit(&source.consumer).await?,
        }
    }
    ctx.ready.set(false);
    for closed in windows.flush(None, Instant::now(), now_millis()) {
        b.emit(closed, &mut acks, &ctx).await?;
    }
    acks.finish(source).await?;
    tracing::info!("micro-batcher stopped");
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Batcher {
    /// The event, or `None` when it was dead-lettered.
    async fn decode(
        &self,
        m: &OwnedMessage,
        acks: &mut Acks,
        ctx: &ServiceContext,
    ) -> anyhow::Result<Option<Event>> {
        let bytes = m.payload().unwrap_or_default();
        match self
            .codec
            .decode_retrying::<Event>(bytes, &ctx.shutdown)
            .await
        {
            Ok(d) => Ok(Some(d.record)),
            Err(DecodeError::Poison { class, message }) => {
                self.metrics
                    .events
                    .with_label_values(&["dead_letter"])
                    .inc();
                acks.dead_letter(&self.dlq, m.clone(), class, message);
                Ok(None)
            }
            Err(e) => Err(anyhow::Error::new(e).context("stopping with an undecoded event")),
        }
    }

    async fn emit(
        &self,
        closed: Closed,
        acks: &mut Acks,
        ctx: &ServiceContext,
    ) -> anyhow::Result<()> {
        let batch = &closed.batch;
        let bytes = self
            .codec
            .encode_retrying(&self.batches_topic, batch, &ctx.shutdown)
            .await?;
        let reason = format!("{:?}", batch.close_reason).to_uppercase();
        self.metrics.closed.with_label_values(&[&reason]).inc();
        self.metrics.batch_size.observe(closed.offsets.len() as f64);
        self.metrics.batch_bytes.observe(bytes.len() as f64);
        self.metrics
            .open_seconds
            .observe(closed.open_for.as_secs_f64());
        let key = batch.source_partition.to_string();
        let delivery = enqueue(
            &self.producer,
            FutureRecord::to(&self.batches_topic)
                .key(&key)
                .payload(&bytes),
        )
        .await?;
        let offsets = closed
            .offsets
            .iter()
            .map(|o| (self.events_topic.clone(), batch.source_partition, *o))
            .collect();
        acks.wait_for(offsets, async move {
            delivered(delivery)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Ok(())
    }
}
