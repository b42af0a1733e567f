//! `lanes-micro-batcher`: Avro `Event`s from `lanes.events` are gathered into one window
//! per assigned partition ([`window`]); a closed window becomes one `MicroBatch` on
//! `lanes.batches`, keyed by its source partition, in columns ready to be one tensor.
//!
//! A window's input offsets are committed only after its batch is acknowledged. When a
//! partition is revoked, and at shutdown, open windows are flushed, their batches
//! acknowledged and their offsets committed before the partition is let go.

mod adaptive;
mod metrics;
pub mod window;

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context;
use lanes_common::FastMap;
use lanes_common::dlq::ErrorClass;
use lanes_common::error::Failure;
use lanes_common::kafka;
use lanes_common::model::ModelSpec;
use lanes_common::records::{Event, now_millis};
use lanes_common::service::{ServiceContext, ServiceDef};
use lanes_common::stage::{self, Input, Out, Plan, Stage};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureRecord;
use tokio::time::Instant;

use crate::window::{Closed, WindowConfig, Windows};

use crate::metrics::Metrics;

pub const SERVICE: &str = "micro-batcher";

pub fn def() -> ServiceDef {
    ServiceDef {
        name: SERVICE,
        admin_port: |s| s.admin.ports.micro_batcher,
        needs_redis: false,
        inputs: |s| vec![(s.micro_batcher.group.clone(), s.topics.events.clone())],
        group: |s| &mut s.micro_batcher.group,
        run: |ctx| Box::pin(run(ctx)),
    }
}

struct Batcher {
    windows: Windows,
    /// The inputs of open windows, per partition in offset order, until their batch is
    /// acknowledged (or refused, then they are dead-lettered).
    held: FastMap<i32, VecDeque<OwnedMessage>>,
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
    let io = stage::io(&ctx, SERVICE, metrics.dead_letters.clone())?;
    let cfg = &s.micro_batcher;
    let b = Batcher {
        windows: Windows::new(
            WindowConfig {
                max_events: cfg.max_events,
                max_bytes: cfg.max_bytes,
                max_delay: Duration::from_millis(cfg.max_delay_ms),
                priority_kinds: cfg.priority_kinds.clone(),
                features: spec.features.clone(),
                target_latency: cfg.target_latency_ms.map(Duration::from_millis),
            },
            &s.topics.events,
        ),
        held: FastMap::default(),
        batches_topic: s.topics.batches.clone(),
        metrics,
    };
    tracing::info!(
        max_events = cfg.max_events,
        max_bytes = cfg.max_bytes,
        max_delay_ms = cfg.max_delay_ms,
        target_latency_ms = ?cfg.target_latency_ms,
        "micro-batcher running"
    );
    b.publish_window();
    let plan = Plan::new(&ctx, SERVICE, &cfg.group, &[&s.topics.events]);
    stage::run(&ctx, plan, b, io).await
}

impl Stage for Batcher {
    type Input = Event;

    async fn handle(&mut self, inputs: Vec<Input<Event>>, out: &mut Out<'_>) -> anyhow::Result<()> {
        let mut unscorable = 0;
        let batched = inputs.len();
        for Input {
            message: m,
            record: event,
        } in inputs
        {
            if let Some((class, reason)) = self.windows.unscorable(&event) {
                out.dead_letter(m, class, reason);
                unscorable += 1;
                continue;
            }
            let (partition, offset) = (m.partition(), m.offset());
            self.held.entry(partition).or_default().push_back(m);
            for closed in self
                .windows
                .push(partition, offset, event, Instant::now(), now_millis())
            {
                self.emit(closed, out).await?;
            }
        }
        // Counted once per call: a label lookup per event hashed the label each time.
        let events = &self.metrics.events;
        events
            .with_label_values(&["batched"])
            .inc_by((batched - unscorable) as u64);
        if unscorable > 0 {
            events
                .with_label_values(&["dead_letter"])
                .inc_by(unscorable as u64);
        }
        Ok(())
    }

    fn deadline(&self) -> Option<Instant> {
        self.windows.next_deadline()
    }

    async fn tick(&mut self, out: &mut Out<'_>) -> anyhow::Result<()> {
        for closed in self.windows.expire(Instant::now(), now_millis()) {
            self.emit(closed, out).await?;
        }
        Ok(())
    }

    async fn flush(
        &mut self,
        partitions: Option<&[(String, i32)]>,
        out: &mut Out<'_>,
    ) -> anyhow::Result<()> {
        let ids: Option<Vec<i32>> = partitions.map(|ps| ps.iter().map(|(_, p)| *p).collect());
        for closed in self
            .windows
            .flush(ids.as_deref(), Instant::now(), now_millis())
        {
            self.emit(closed, out).await?;
        }
        Ok(())
    }

    fn rejected(&mut self, _class: ErrorClass) {
        self.metrics
            .events
            .with_label_values(&["dead_letter"])
            .inc();
    }
}

impl Batcher {
    /// The windows' current delay and size, as metrics.
    fn publish_window(&self) {
        self.metrics
            .window_delay
            .set(self.windows.delay().as_secs_f64());
        self.metrics
            .window_size
            .set(self.windows.largest_size() as i64);
    }

    /// The held inputs of a closed window.
    fn take_inputs(&mut self, partition: i32, offsets: &[i64]) -> Vec<OwnedMessage> {
        let Some(held) = self.held.get_mut(&partition) else {
            return Vec::new();
        };
        let (taken, kept): (Vec<OwnedMessage>, Vec<OwnedMessage>) = held
            .drain(..)
            .partition(|m| offsets.binary_search(&m.offset()).is_ok());
        held.extend(kept);
        if held.is_empty() {
            self.held.remove(&partition);
        }
        taken
    }

    async fn emit(&mut self, closed: Closed, out: &mut Out<'_>) -> anyhow::Result<()> {
        self.publish_window();
        let batch = &closed.batch;
        let inputs = self.take_inputs(batch.source_partition, &closed.offsets);
        let bytes = out.encode(&self.batches_topic, batch).await?;
        let reason = batch.close_reason.as_str();
        self.metrics.closed.with_label_values(&[reason]).inc();
        self.metrics.batch_size.observe(closed.offsets.len() as f64);
        self.metrics.batch_bytes.observe(bytes.len() as f64);
        self.metrics
            .open_seconds
            .observe(closed.open_for.as_secs_f64());
        let key = batch.source_partition.to_string();
        let record = FutureRecord::to(&self.batches_topic)
            .key(&key)
            .payload(&bytes);
        match out.produce(record).await {
            Ok(()) => out.done_when_delivered(inputs),
            Err(Failure::Poison { class, message }) => {
                for m in inputs {
                    out.dead_letter(m, class, message.clone());
                }
            }
            Err(e) => return Err(e).context("producing a batch"),
        }
        Ok(())
    }
}
